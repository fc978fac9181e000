"""Creating, tracking and ending media sessions; one inference scheduler for all of them."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole
from aiortc.exceptions import InvalidAccessError, OperationError
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import SessionDescription

from rtc_server.scheduler import InferenceScheduler
from rtc_server.session import Photo, Session, SessionOptions
from wav2lip.engine import MouthEngine
from wav2lip.threads import name_this_thread

log = logging.getLogger(__name__)


class SessionsFull(Exception):
    """At the session limit; try again later."""


class BadOffer(ValueError):
    """The offer cannot start a session; the message says why."""


@dataclass(frozen=True)
class ManagerOptions:
    max_sessions: int
    delay: float
    idle_timeout: float
    bitrate: int
    max_batch: int


def _accepts_audio(sdp: str) -> bool:
    """Whether the peer accepts the returned audio; checks it sends audio and receives video."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser fails with many types, asserts among them
        raise BadOffer(f"malformed SDP: {exc or type(exc).__name__}") from exc
    audio = [m for m in description.media if m.kind == "audio"]
    video = [m for m in description.media if m.kind == "video"]
    if not audio or audio[0].direction not in ("sendrecv", "sendonly"):
        raise BadOffer("the offer must send an audio track (the microphone)")
    if not video or video[0].direction not in ("sendrecv", "recvonly"):
        raise BadOffer("the offer must receive a video track (add a recvonly video transceiver)")
    return audio[0].direction == "sendrecv"


class SessionManager:
    def __init__(
        self,
        engine: MouthEngine,
        options: ManagerOptions,
        rtc_configuration: Callable[[], RTCConfiguration],
    ) -> None:
        self.engine = engine
        self.options = options
        self.scheduler = InferenceScheduler(engine, options.max_batch)
        self._rtc_configuration = rtc_configuration
        self.sessions: dict[str, Session] = {}
        self._sinks: dict[str, MediaBlackhole] = {}
        self._starting = 0  # offers between the limit check and their session's creation

    def __len__(self) -> int:
        return len(self.sessions)

    async def start(self) -> None:
        # aiortc encodes video on the loop's default executor: named, its CPU use shows apart.
        executor = ThreadPoolExecutor(initializer=name_this_thread, initargs=("executor",))
        asyncio.get_running_loop().set_default_executor(executor)
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())))
        await asyncio.to_thread(self.scheduler.stop)

    async def create(self, sdp: str, photo: Photo) -> tuple[Session, str]:
        """Answer an offer: returns the new session and the answer's SDP."""
        # The slot is taken before the first await: concurrent offers cannot overshoot.
        if len(self.sessions) + self._starting >= self.options.max_sessions:
            raise SessionsFull(f"all {self.options.max_sessions} sessions are in use")
        self._starting += 1
        try:
            send_audio = _accepts_audio(sdp)
            face = await asyncio.to_thread(self.engine.prepare, photo.face_input)
        finally:
            self._starting -= 1
        pc = RTCPeerConnection(self._rtc_configuration())
        session = Session(
            uuid.uuid4().hex,
            pc,
            photo,
            face,
            self.scheduler,
            SessionOptions(
                delay=self.options.delay,
                idle_timeout=self.options.idle_timeout,
                bitrate=self.options.bitrate,
                send_audio=send_audio,
            ),
            self._forget,
        )
        self.sessions[session.id] = session
        try:
            answer = await self._negotiate(pc, session, sdp)
        except Exception:
            await session.close()
            raise
        log.info("session %s started (%d live)", session.id, len(self.sessions))
        return session, answer

    async def _negotiate(self, pc: RTCPeerConnection, session: Session, sdp: str) -> str:
        sink = MediaBlackhole()  # drains any track we do not use (a camera, say)
        self._sinks[session.id] = sink

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if not (track.kind == "audio" and session.attach_microphone(track)):
                sink.addTrack(track)

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label == "events":
                session.attach_events(channel)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and not session.closed:
                session.start(video_sender)
            elif pc.connectionState in ("failed", "closed"):
                await session.close()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            video_sender = pc.addTrack(session.video_track)
            if session.audio_track is not None:
                pc.addTrack(session.audio_track)
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

    async def _forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        sink = self._sinks.pop(session.id, None)
        if sink is not None:
            await sink.stop()
        log.info("session %s ended (%d live)", session.id, len(self.sessions))
