"""Creating, tracking and ending media sessions; one inference scheduler for all of them.

A new session needs a free slot twice over: under `max_sessions`, a hard cap, and within what
the device was measured to do, so that every session keeps at least `min_fps` really inferred
frames a second (admitting more would turn most of everyone's frames into repeats). If the
engine fails for good, every session ends with an `error` event, health turns `degraded`, and
`failed` is set for the process to exit and be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole
from aiortc.exceptions import InvalidAccessError, OperationError
from aiortc.mediastreams import MediaStreamTrack

from rtc_server.avatars import Avatar
from rtc_server.metrics import MediaMetrics
from rtc_server.offers import CALLER, PUSHER, VIEWER, BadOffer, for_ice, read_offer
from rtc_server.receivers import decode_audio_promptly
from rtc_server.scheduler import HEADROOM, InferenceScheduler
from rtc_server.session import Session, SessionOptions
from wav2lip import audio as mel
from wav2lip.audio import Alignment
from wav2lip.engine import MouthEngine
from wav2lip.threads import name_this_thread

log = logging.getLogger(__name__)


class SessionsFull(Exception):
    """No session can start here now; try again later. `reason`: "full" (`max_sessions`),
    "capacity" (what the device does) or "draining" (the worker is shutting down)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class MediaFailed(Exception):
    """The engine has failed for good: no session can start until the process restarts."""


@dataclass(frozen=True)
class ManagerOptions:
    max_sessions: int
    delay: float
    idle_timeout: float
    bitrate: int
    max_batch: int
    peer_timeout: float  # seconds without a packet from the peer before it counts as gone
    min_fps: float  # inferred frames a second every session must still get; 0: no check
    push_buffer: float = 60.0  # seconds of pushed audio a session may hold
    alignment: Alignment = "training"  # which audio window each frame gets
    adaptive_delay: bool = False  # whether the delay follows the measured jitter
    silence_db: float = -80.0  # audio below this shows the cached silent mouth


class SessionManager:
    def __init__(
        self,
        engine: MouthEngine,
        options: ManagerOptions,
        rtc_configuration: Callable[[], RTCConfiguration],
        metrics: MediaMetrics,
    ) -> None:
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self.scheduler = InferenceScheduler(
            engine, options.max_batch, self._engine_failed, metrics.batch_seconds.observe
        )
        self._rtc_configuration = rtc_configuration
        self.draining = False  # set on SIGTERM: live sessions go on, no new one starts
        self.on_change: Callable[[], None] | None = None  # told when a session starts or ends
        self.sessions: dict[str, Session] = {}
        self._sinks: dict[str, MediaBlackhole] = {}
        self._starting = 0  # offers between the limit check and their session's creation
        self.failed = asyncio.Event()  # set when the engine has failed for good

    def __len__(self) -> int:
        return len(self.sessions)

    async def start(self) -> None:
        """Start the scheduler and wait for its warm-up: sessions come only once the device's
        speed is known. EngineFailure if the engine cannot even warm up."""
        # aiortc encodes video on the loop's default executor: named, its CPU use shows apart.
        executor = ThreadPoolExecutor(initializer=name_this_thread, initargs=("executor",))
        asyncio.get_running_loop().set_default_executor(executor)
        # Before the warm-up, whose timing would count the import's seconds against the device.
        await asyncio.to_thread(mel.prepare)
        self.scheduler.start()
        await self.scheduler.warmed_up()

    def capacity(self) -> int:
        """Sessions this server takes: `max_sessions`, or fewer when the device, as measured,
        could not give each of them `min_fps` inferred frames a second."""
        if self.options.min_fps <= 0:
            return self.options.max_sessions
        device = math.floor(HEADROOM * self.scheduler.device_fps / self.options.min_fps)
        return min(self.options.max_sessions, device)

    def headroom(self) -> int:
        """How many more sessions would be taken now."""
        if self.draining or self.scheduler.failure:
            return 0
        return max(0, self.capacity() - len(self.sessions) - self._starting)

    def _engine_failed(self, reason: str) -> None:
        log.error("engine failed for good: %s; ending every session", reason)
        for session in list(self.sessions.values()):
            session.end_with_error("engine_failed", f"the server's engine failed ({reason})")
        self.failed.set()

    async def stop(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())))
        await asyncio.to_thread(self.scheduler.stop)

    async def create(
        self,
        session_id: str,
        sdp: str,
        avatar: Avatar,
        kind: str = CALLER,
        push_rate: int | None = None,
    ) -> str:
        """Answer an offer (of a caller, a pusher or an ingest: `rtc_server.offers`) with a
        new session of this id; returns the answer's SDP. A pusher's audio comes at
        `push_rate`."""
        try:
            self._admit()
        except (SessionsFull, MediaFailed) as exc:
            reason = exc.reason if isinstance(exc, SessionsFull) else "degraded"
            self.metrics.sessions_refused.labels(reason).inc()
            raise
        # The slot is taken before the first await: concurrent offers cannot overshoot.
        self._starting += 1
        try:
            offer = read_offer(sdp, kind)
            face = await asyncio.to_thread(self.engine.prepare, avatar.face_input)
        finally:
            self._starting -= 1
        pc = RTCPeerConnection(self._rtc_configuration())
        session = Session(
            session_id,
            pc,
            avatar,
            face,
            self.scheduler,
            SessionOptions(
                delay=self.options.delay,
                idle_timeout=self.options.idle_timeout,
                bitrate=self.options.bitrate,
                send_audio=offer.receives_audio,
                peer_timeout=self.options.peer_timeout,
                push_rate=push_rate if kind == PUSHER else None,
                push_buffer=self.options.push_buffer,
                alignment=self.options.alignment,
                adaptive_delay=self.options.adaptive_delay,
                silence_db=self.options.silence_db,
            ),
            self._forget,
            self.metrics,
        )
        self.sessions[session.id] = session
        try:
            answer = await self._negotiate(pc, session, sdp, offer.receives_video)
        except Exception:
            await session.close()
            raise
        self.metrics.sessions_started.inc()
        self._changed()
        log.info("session %s started (%d live)", session.id, len(self.sessions))
        return answer

    def _changed(self) -> None:
        self.metrics.sessions_live.set(len(self.sessions))
        if self.on_change is not None:
            self.on_change()

    def _admit(self) -> None:
        """SessionsFull or MediaFailed unless one more session may start now."""
        if self.scheduler.failure is not None:
            raise MediaFailed(f"the server's engine has failed ({self.scheduler.failure})")
        if self.draining:
            raise SessionsFull("draining", "this worker is shutting down")
        taken = len(self.sessions) + self._starting
        if taken >= self.options.max_sessions:
            raise SessionsFull("full", f"all {self.options.max_sessions} sessions are in use")
        if taken >= self.capacity():
            raise SessionsFull(
                "capacity",
                f"the device makes {self.scheduler.device_fps:.0f} frames a second, enough for "
                f"{self.capacity()} session(s) at {self.options.min_fps:g} inferred fps each, "
                "and all are in use",
            )

    async def _negotiate(
        self, pc: RTCPeerConnection, session: Session, sdp: str, send_video: bool
    ) -> str:
        sink = MediaBlackhole()  # drains any track we do not use (a camera, say)
        self._sinks[session.id] = sink

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            pushed = session.pushed is not None  # a pusher's microphone, if any, is unused
            if pushed or not (track.kind == "audio" and session.attach_microphone(track)):
                sink.addTrack(track)

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label == "events":
                session.attach_events(channel)
            elif channel.label == "audio":
                session.attach_pushed_audio(channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and not session.closed:
                session.start()
            elif pc.connectionState in ("failed", "closed"):
                await session.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=for_ice(sdp), type="offer"))
            decode_audio_promptly(pc)
            if send_video:
                session.send_video(pc.addTrack(session.video_track()))
            if session.options.send_audio:
                pc.addTrack(session.audio_track())
            answer = await pc.createAnswer()
        except (ValueError, AssertionError, InvalidAccessError, OperationError) as exc:
            raise BadOffer(f"the offer could not be answered: {exc}") from exc
        await sink.start()
        await pc.setLocalDescription(answer)
        session.watch()
        return pc.localDescription.sdp

    async def close(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        await session.close()
        return True

    async def add_viewer(self, session_id: str, viewer_id: str, sdp: str) -> str | None:
        """Answer a viewer's offer: the session's video (and audio, if asked for), made once
        for every receiver. None if there is no such session."""
        session = self.sessions.get(session_id)
        if session is None:
            return None
        offer = read_offer(sdp, VIEWER)
        pc = RTCPeerConnection(self._rtc_configuration())
        session.viewers[viewer_id] = pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.end_viewer(session_id, viewer_id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=for_ice(sdp), type="offer"))
            session.send_video(pc.addTrack(session.video_track()))
            if offer.receives_audio:
                pc.addTrack(session.audio_track())
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AssertionError, InvalidAccessError, OperationError) as exc:
            await self.end_viewer(session_id, viewer_id)
            raise BadOffer(f"the offer could not be answered: {exc}") from exc
        log.info("session %s: viewer %s (%d)", session_id, viewer_id, len(session.viewers))
        return str(pc.localDescription.sdp)

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool:
        session = self.sessions.get(session_id)
        pc = session.viewers.pop(viewer_id, None) if session is not None else None
        if pc is None:
            return False
        await pc.close()
        return True

    async def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self._changed()
        sink = self._sinks.pop(session.id, None)
        if sink is not None:
            await sink.stop()
        log.info("session %s ended (%d live)", session.id, len(self.sessions))
