"""A media worker: one engine on one device, the sessions it runs and the avatars they show.

The front door uses a worker through four calls, over HTTP (`signaling/worker_api.py`) in a
cluster, or directly in the one-process server:

- `status()`: its state and load, for health and for placing sessions;
- `analyse(avatar_id, photo)`: a photo checked, fitted and its face found (PhotoError if not);
- `create_session(session_id, sdp, avatar_id, photo, kind)`: the answer to an offer of a
  caller or an ingest (`rtc_server.offers`); the photo is needed only if this worker has not
  analysed it yet (AvatarNeeded otherwise);
- `end_session(session_id)`;
- `add_viewer(session_id, viewer_id, sdp)` and `end_viewer`: someone else watching a session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCConfiguration
from aiortc.rtcicetransport import connection_kwargs

from rtc_server.avatars import Avatar, Avatars, PhotoLimits
from rtc_server.dtls import accept_rsa_peers
from rtc_server.engines import backend_name, default_delay, device_name, max_batch
from rtc_server.manager import ManagerOptions, SessionManager
from rtc_server.metrics import MediaMetrics
from rtc_server.offers import CALLER
from wav2lip.audio import Alignment
from wav2lip.engine import MouthEngine

SERVING, DRAINING, DEGRADED = "serving", "draining", "degraded"


class AvatarNeeded(LookupError):
    """This worker has not analysed that photo: send the photo along."""


@dataclass(frozen=True)
class WorkerSettings:
    max_sessions: int = 4
    min_fps: float = 20.0
    peer_timeout: float = 10.0
    idle_timeout: float = 30.0
    bitrate: int = 1_500_000
    delay: float | None = None  # seconds; None: the engine's default
    push_buffer: float = 60.0  # seconds of pushed audio a session may hold
    alignment: Alignment = "training"  # which audio window each frame gets
    silence_db: float = -80.0  # audio below this shows the cached silent mouth
    max_batch: int | None = None  # frames inferred together at most; None: the engine's own
    photo_limits: PhotoLimits = field(default_factory=PhotoLimits)
    avatar_limit: int = 32
    weights_cache: Path | None = None  # where S3FD's weights may be cached


class Worker:
    def __init__(
        self,
        engine: MouthEngine,
        settings: WorkerSettings,
        rtc_configuration: Callable[[], RTCConfiguration],
        worker_id: str,
    ) -> None:
        self.id = worker_id
        self.url = ""  # where the front door reaches it; set by whoever serves it
        self.engine = engine
        self.metrics = MediaMetrics()
        self.manager = SessionManager(
            engine,
            ManagerOptions(
                max_sessions=settings.max_sessions,
                delay=(
                    settings.delay
                    if settings.delay is not None
                    else default_delay(engine, settings.alignment)
                ),
                idle_timeout=settings.idle_timeout,
                bitrate=settings.bitrate,
                max_batch=settings.max_batch or max_batch(engine),
                peer_timeout=settings.peer_timeout,
                min_fps=settings.min_fps,
                push_buffer=settings.push_buffer,
                alignment=settings.alignment,
                adaptive_delay=settings.delay is None,
                silence_db=settings.silence_db,
            ),
            rtc_configuration,
            self.metrics,
        )
        self.avatars = Avatars(settings.photo_limits, settings.avatar_limit, settings.weights_cache)
        self._server_ice = server_ice(rtc_configuration())

    @property
    def failed(self) -> Any:
        """An asyncio.Event set once the engine has failed for good."""
        return self.manager.failed

    async def start(self) -> None:
        """Prepare the default avatar and warm the engine up (EngineFailure if it cannot)."""
        accept_rsa_peers()
        await self.avatars.start()
        await self.manager.start()

    async def stop(self) -> None:
        """End every session and stop the engine's thread."""
        await self.manager.stop()
        self.avatars.close()

    def drain(self) -> None:
        """Take no new session; the live ones go on."""
        self.manager.draining = True

    @property
    def state(self) -> str:
        if self.manager.scheduler.failure is not None:
            return DEGRADED
        return DRAINING if self.manager.draining else SERVING

    def status(self) -> dict[str, Any]:
        """What the front door shows in health and places sessions by."""
        manager = self.manager
        status: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "engine": self.engine.name,
            "device": device_name(self.engine),
            "backend": backend_name(self.engine),
            "max_batch": manager.options.max_batch,
            "state": self.state,
            "sessions": len(manager),
            "max_sessions": manager.options.max_sessions,
            "capacity": manager.capacity(),
            "headroom": manager.headroom(),
            "device_fps": round(manager.scheduler.device_fps, 1),
            "min_fps": manager.options.min_fps,
            "session_ids": sorted(manager.sessions),
            "server_ice": self._server_ice,
        }
        if manager.scheduler.failure is not None:
            status["reason"] = manager.scheduler.failure
        return status

    async def analyse(self, avatar_id: str, photo: bytes) -> Avatar:
        return await self.avatars.analyse(avatar_id, photo)

    async def create_session(
        self,
        session_id: str,
        sdp: str,
        avatar_id: str,
        photo: bytes | None = None,
        kind: str = CALLER,
        push_rate: int | None = None,
    ) -> str:
        """The answer to an offer; AvatarNeeded if the photo must come along."""
        avatar = self.avatars.get(avatar_id)
        if avatar is None:
            if photo is None:
                raise AvatarNeeded(avatar_id)
            avatar = await self.avatars.analyse(avatar_id, photo)
        return await self.manager.create(session_id, sdp, avatar, kind, push_rate)

    async def end_session(self, session_id: str) -> bool:
        return await self.manager.close(session_id)

    async def add_viewer(self, session_id: str, viewer_id: str, sdp: str) -> str | None:
        return await self.manager.add_viewer(session_id, viewer_id, sdp)

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool:
        return await self.manager.end_viewer(session_id, viewer_id)


def server_ice(configuration: RTCConfiguration) -> dict[str, str | None]:
    """The one STUN and one TURN server aiortc really uses of those configured, asked of
    aiortc itself (browsers use them all)."""
    used: dict[str, Any] = connection_kwargs(configuration.iceServers or [])
    turn = None
    if "turn_server" in used:
        host, port = used["turn_server"]
        scheme = "turns" if used["turn_ssl"] else "turn"
        turn = f"{scheme}:{host}:{port}?transport={used['turn_transport']}"
    stun = "stun:{}:{}".format(*used["stun_server"]) if "stun_server" in used else None
    return {"stun": stun, "turn": turn}
