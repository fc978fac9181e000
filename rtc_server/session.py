"""One media session: a microphone in, a lip-synced video track and the audio back out.

The data's path: the `Microphone` places 16 kHz samples on the session's `AudioTimeline`; the
producer reads them in order into a `MelStream`, and as soon as a video frame's mel window is
complete (or its audio is overdue, which then counts as silence) submits the frame to the
shared `InferenceScheduler` with the time it is due; the scheduler's thread infers and pastes
the mouth; the `LipSyncVideoTrack` sends each frame when due, repeating the previous one if
its own did not arrive in time; the `ReturnedAudioTrack` sends the same audio on the same clock.

Several receivers may take the same video and audio: the peer that sends the microphone, and
viewers (WHEP). Each has its own tracks, paced by the one clock; a frame is made once and
handed to each receiver that asks for its index, so a viewer costs its encoding, not inference.

Instead of a microphone, a program may push its audio (`PushedAudio`, on the `audio` data
channel), and control playback on the `events` channel: `clear_buffer` drops everything not
yet shown (the frames already made for it too: the face rests, the returned audio falls
silent), `end_of_segment` closes an utterance; the session says when each one's first and last
frames went out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import av
import cv2
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamTrack

from rtc_server.avatars import Avatar
from rtc_server.clock import VIDEO_FRAME_SECONDS, SessionClock
from rtc_server.jitter import JitterAllowance
from rtc_server.metrics import MediaMetrics
from rtc_server.microphone import Microphone
from rtc_server.pushed import Overfull, PushedAudio
from rtc_server.scheduler import InferenceScheduler
from rtc_server.timeline import SAMPLE_RATE, AudioTimeline
from rtc_server.tracks import (
    VIDEO_PTS_STEP,
    VIDEO_TIME_BASE,
    LipSyncVideoTrack,
    ReturnedAudioTrack,
)
from wav2lip.audio import (
    MAX_ABS,
    MEL_STEP,
    N_MELS,
    SAMPLES_PER_VIDEO_FRAME,
    Alignment,
    MelStream,
    mel_level,
    samples_needed,
    window_start,
)
from wav2lip.blend import Blender

log = logging.getLogger(__name__)

# Audio later than this (beyond when it should have arrived) is taken as silence: the jitter
# allowance a session starts with, and keeps when its delay is set by hand.
JITTER_SECONDS = 0.06
# The delay follows the measured allowance when they differ by more than this; growing at most
# a frame every GROW_EVERY, shrinking at most a frame every SHRINK_EVERY and only in a pause.
DELAY_SLACK = 0.005
GROW_EVERY = 0.2
SHRINK_EVERY = 1.0
MAX_READY = 16  # finished frames waiting for their turn (0.64 s)
AUDIO_CHUNKS_KEPT = 16  # returned audio chunks kept for receivers a little behind (0.32 s)
SPEECH_RMS = 0.01  # about -40 dBFS
SPEECH_HANGOVER = 0.4  # seconds of quiet before speaking counts as stopped
# A connection not up this long after the answer never will be (ICE and DTLS take a second or
# two, through TURN a few): its slot is freed.
CONNECT_TIMEOUT = 20.0
WATCH_PERIOD = 1.0
# How long an `error` event may take to leave before the connection closes under it.
ERROR_FLUSH_SECONDS = 0.5


@dataclass(frozen=True)
class SessionOptions:
    delay: float  # seconds from a sound's arrival to the frame that shows it going out
    idle_timeout: float  # seconds without microphone media before the session ends
    bitrate: int  # initial video bitrate, bits per second
    send_audio: bool  # whether the peer accepts the returned audio
    peer_timeout: float  # seconds without any packet from the peer before it counts as gone
    push_rate: int | None = None  # pushed audio's sample rate, when the input is pushed
    push_buffer: float = 60.0  # seconds of pushed audio that may wait to be played
    alignment: Alignment = "training"  # which audio window each video frame gets
    # Whether the delay follows the measured jitter (it does unless set by hand).
    adaptive_delay: bool = False
    # Windows whose every mel value is below this level (dB on Wav2Lip's scale, where digital
    # silence is -100) are silence: their mouth is the session's cached silent one.
    silence_db: float = -80.0


class Session:
    """Owns everything one peer uses; `close` frees all of it."""

    def __init__(
        self,
        session_id: str,
        pc: RTCPeerConnection,
        photo: Avatar,
        face: Any,
        scheduler: InferenceScheduler,
        options: SessionOptions,
        on_closed: Callable[[Session], Awaitable[None]],
        metrics: MediaMetrics,
    ) -> None:
        self.id = session_id
        self.pc = pc
        self.options = options
        self.clock = SessionClock(options.delay)
        self.face = face
        self.closed = False
        self._photo = photo
        self._metrics = metrics
        self._scheduler = scheduler
        self._on_closed = on_closed
        self._blender = Blender(photo.box, photo.image.shape)
        self._timeline = AudioTimeline(("mel", "out"))
        self._audio_chunks: dict[int, np.ndarray] = {}  # start sample -> returned audio
        self._mel_stream = MelStream()
        self._mel = np.zeros((N_MELS, 0), dtype=np.float32)
        self._mel_base = 0  # mel frame index of self._mel[:, 0]
        self._next_frame = 0  # next video frame to submit
        self._ready: dict[int, av.VideoFrame] = {}
        self._sent_upto = 0  # frames below this were sent already; late results are dropped
        self._resting = self._to_video_frame(photo.image)  # the photo as it is
        self._last_frame = self._resting
        self._rest = range(0)  # frames shown as the resting face: their audio was cleared
        self._shown_index = -1  # the index of the frame last handed out
        self._shown_arrival: float | None = None  # when the shown mouth's audio arrived
        self._audio_event = asyncio.Event()
        # (end sample, arrival time) of recent microphone frames, for measuring lag.
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=500)
        self._tasks: list[asyncio.Task[None]] = []
        self._microphone: Microphone | None = None
        self.pushed = (
            PushedAudio(
                options.push_rate,
                self._timeline,
                self._audio_time,
                self._on_audio,
                options.push_buffer,
                self._on_late,
            )
            if options.push_rate
            else None
        )
        self._events: RTCDataChannel | None = None
        self._last_control = time.monotonic()
        self._video_senders: list[RTCRtpSender] = []  # whose encoders still need the bitrate
        self.viewers: dict[str, RTCPeerConnection] = {}
        self.tracks: list[MediaStreamTrack] = []  # every receiver's, stopped with the session
        self._closing: asyncio.Task[None] | None = None
        self._speaking = False
        self._quiet_since = 0.0
        self._loud: deque[tuple[int, int]] = deque(maxlen=100)  # recent loud spans (samples)
        # Counters: totals, and the last second's window for the stats message.
        self.delivered = 0
        self.generated = 0
        self.repeated = 0
        self.skipped = 0  # frames not rendered in time (each shows as a repeat)
        self.longest_repeat_run = 0  # repeats in a row: even degradation keeps this small
        self._repeat_run = 0
        self._lags: deque[float] = deque(maxlen=100)
        self._infer_ms: deque[float] = deque(maxlen=100)
        # How long to wait for late audio, and the delay without it: they move together.
        self.jitter = JitterAllowance(JITTER_SECONDS)
        self._delay_floor = options.delay - JITTER_SECONDS
        self._delay_moved = 0.0  # when the delay last moved (time.monotonic())
        self.audio_missing = 0  # frames that went ahead before their microphone audio came
        # Silence: every silent window is inferred as the same one, once; then reused.
        self._silence_level = mel_level(options.silence_db)
        # Silent frames sent to be inferred while there is no cache yet: the first of them
        # to come back becomes it (several may be in flight: a silence goes on meanwhile).
        self._silent_pending: set[int] = set()
        self._silent_frame: np.ndarray | None = None  # its I420 picture
        self.silent = 0  # frames shown with the cached silent mouth

    # -- wiring ---------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run a part of the session; if it fails, log why and end the session, so nothing
        is left half-working."""
        task = asyncio.create_task(work, name=f"{name}-{self.id}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None or self.closed:
            return
        log.error("session %s: %s failed", self.id, task.get_name(), exc_info=task.exception())
        part = task.get_name().removesuffix(f"-{self.id}")
        self.end_with_error("internal", f"the session's {part} failed")

    def _track_failed(self, kind: str, exc: Exception) -> None:
        log.error("session %s: the %s track failed", self.id, kind, exc_info=exc)
        self.end_with_error("internal", f"the session's outgoing {kind} failed")

    def end_with_error(self, code: str, message: str) -> None:
        """End the session because part of the server failed: the peer gets an `error` event
        saying why, then the connection closes."""
        if self.closed or self._closing is not None:
            return
        self._send({"type": "error", "code": code, "message": message, "fatal": True})
        self._closing = asyncio.create_task(self._close_after_flush())

    async def _close_after_flush(self) -> None:
        """Close once the data channel has sent what it holds (the error), or after a moment."""
        channel = self._events
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ERROR_FLUSH_SECONDS):
                while channel is not None and channel.bufferedAmount > 0:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # the transport's own send queue
        await self.close()

    def watch(self) -> None:
        """End the session when its peer never connects, vanishes, or sends no media."""
        self._spawn(self._watch(), "watch")

    def video_track(self) -> LipSyncVideoTrack:
        """A video track for one more receiver."""
        track = LipSyncVideoTrack(self.clock, self, self._track_failed)
        self.tracks.append(track)
        return track

    def audio_track(self) -> ReturnedAudioTrack:
        """A returned-audio track for one more receiver."""
        track = ReturnedAudioTrack(self.clock, self, self._track_failed)
        self.tracks.append(track)
        return track

    def send_video(self, sender: RTCRtpSender) -> None:
        """A sender of this session's video, whose encoder gets the starting bitrate."""
        self._video_senders.append(sender)

    def start(self) -> None:
        """Begin once the connection is up: the clock, frame production and stats."""
        if self.clock.started.is_set():
            return
        self.clock.start()
        self._spawn(self._produce(), "produce")
        self._spawn(self._report(), "report")
        if self.pushed is not None:
            self._spawn(self.pushed.run(), "pushed audio")

    def attach_microphone(self, track: MediaStreamTrack) -> bool:
        """Take the peer's first audio track as the microphone; False if there is one already
        (the caller must then drain the track some other way)."""
        if self._microphone is not None:
            return False
        self._microphone = Microphone(
            track, self._timeline, self._audio_time, self._on_audio, self._on_late
        )
        self._spawn(self._microphone.run(), "microphone")
        return True

    def attach_events(self, channel: RTCDataChannel) -> None:
        self._events = channel
        channel.on("message", self._on_control)

    def attach_pushed_audio(self, channel: RTCDataChannel) -> None:
        """The `audio` channel of a session whose input is pushed."""
        channel.on("message", self._on_pushed)

    def _on_pushed(self, message: bytes | str) -> None:
        if self.pushed is None:
            return
        if isinstance(message, str):
            self._warn("bad_audio", "the audio channel takes binary PCM s16le, not text")
            return
        try:
            self.pushed.push(message)
        except Overfull as exc:
            self._warn("buffer_full", str(exc))

    def _on_control(self, message: bytes | str) -> None:
        """A message on the events channel: clear_buffer or end_of_segment. Anything else is
        answered with an error event, and the session goes on."""
        self._last_control = time.monotonic()
        try:
            request = json.loads(message)
            kind = request.get("type") if isinstance(request, dict) else None
        except (ValueError, UnicodeDecodeError):
            kind = None
        if kind == "clear_buffer":
            self.clear_buffer()
        elif kind == "end_of_segment":
            if self.pushed is not None:
                self.pushed.end_segment()
        else:
            self._warn(
                "bad_message",
                'the events channel takes JSON {"type": "clear_buffer"} or '
                f'{{"type": "end_of_segment"}}; not {str(message)[:80]!r}',
            )

    def clear_buffer(self) -> None:
        """Drop everything not yet shown: the pushed audio still waiting, and what is already
        on the timeline beyond the frames sent. Those frames show the resting face, made or
        not, and the returned audio is silent from the next 20 ms on."""
        first = self._shown_index + 1
        cleared_end = self._timeline.written_end
        self._rest = range(first, max(first, -(-cleared_end // SAMPLES_PER_VIDEO_FRAME)))
        for index in [k for k in self._ready if k >= first]:
            del self._ready[index]
        self._scheduler.forget(self)  # what waits to be inferred was made from that audio
        out = self._timeline.position("out")
        self._timeline.silence_from(min(out, first * SAMPLES_PER_VIDEO_FRAME))
        for start in [k for k in self._audio_chunks if k >= out]:
            del self._audio_chunks[start]
        if self.pushed is not None:
            for event in self.pushed.interrupt(first * SAMPLES_PER_VIDEO_FRAME):
                self._send(event)

    def _warn(self, code: str, message: str) -> None:
        """An error event for the peer, after which the session goes on."""
        self._send({"type": "error", "code": code, "message": message, "fatal": False})

    def _audio_time(self) -> float:
        """Where arriving audio goes: audio before the clock starts is placed at its start."""
        return self.clock.now() if self.clock.started.is_set() else 0.0

    def _on_audio(self, end: int, arrival: float) -> None:
        self._arrivals.append((end, arrival))
        self._audio_event.set()

    def _on_late(self, seconds: float) -> None:
        """Audio came `seconds` after its place on the timeline."""
        if self.options.adaptive_delay:
            self.jitter.observe(seconds)

    def _quiet_around_output(self) -> bool:
        """Whether the audio going out now, and 0.1 s either side of it, is quiet: a pause
        in which the send times may shift without anyone seeing or hearing it."""
        shown = round((self.clock.now() - self.clock.delay) * SAMPLE_RATE)
        first, last = shown - SAMPLE_RATE // 10, shown + SAMPLE_RATE // 10
        return not any(start < last and end > first for start, end in self._loud)

    def _adapt_delay(self) -> None:
        """Move the delay toward the look-ahead, the render budget and the measured jitter
        allowance, a frame at most at a time: growing promptly (audio would otherwise be
        missing), shrinking once a second and only in a pause. The video and the returned
        audio move together, both paced by the one clock; a shift shows as one frame held a
        little longer or sent a little sooner."""
        if not self.options.adaptive_delay:
            return
        gap = self._delay_floor + self.jitter.value - self.clock.delay
        since = time.monotonic() - self._delay_moved
        if gap > DELAY_SLACK and since >= GROW_EVERY:
            shift = min(gap, VIDEO_FRAME_SECONDS)
        elif gap < -DELAY_SLACK and since >= SHRINK_EVERY and self._quiet_around_output():
            shift = max(gap, -VIDEO_FRAME_SECONDS)
        else:
            return
        self.clock.delay += shift
        self._delay_moved = time.monotonic()

    # -- producing frames -----------------------------------------------------------------

    async def _produce(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
            # lands as the event is set, and close() would wait for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(VIDEO_FRAME_SECONDS / 2):
                    await self._audio_event.wait()
            self._audio_event.clear()
            self._advance()

    def _advance(self) -> None:
        """Read new audio into mel frames and submit every frame whose window is complete."""
        self._adapt_delay()
        now = self.clock.now()
        # Returned audio nobody takes (no receiver wants it) is let go of.
        behind = round((now - self.clock.delay) * SAMPLE_RATE) - SAMPLE_RATE // 2
        if self._timeline.position("out") < behind:
            self._timeline.read("out", behind)
        end = self._timeline.written_end
        # Frames whose audio is overdue go ahead with silence: a stalled or muted microphone
        # still yields 25 fps of resting mouth. Overdue by the allowance the delay has room
        # for: while the delay grows toward a larger allowance, a frame that waited for the
        # allowance itself would be past due when its audio came, and not be made at all.
        wait = min(self.jitter.value, self.clock.delay - self._delay_floor)
        overdue = self._next_frame
        alignment = self.options.alignment
        while samples_needed(overdue, alignment) / SAMPLE_RATE + wait <= now:
            overdue += 1
        if overdue > self._next_frame:
            if self._microphone is not None and not self._microphone.ended:
                self.audio_missing += sum(
                    samples_needed(f, alignment) > end for f in range(self._next_frame, overdue)
                )
            end = max(end, samples_needed(overdue - 1, alignment))
        if end > self._timeline.position("mel"):
            start = self._timeline.position("mel")
            samples = self._timeline.read("mel", end)
            self._track_speaking(samples, start)
            self._mel = np.concatenate((self._mel, self._mel_stream.push(samples)), axis=1)
        self._submit_ready()

    def _submit_ready(self) -> None:
        available = self._mel_base + self._mel.shape[1]
        frame = self._next_frame
        alignment = self.options.alignment
        while window_start(frame, alignment) + MEL_STEP <= available:
            start = window_start(frame, alignment) - self._mel_base
            due = self.clock.due(frame * VIDEO_FRAME_SECONDS)
            window = self._mel[:, start : start + MEL_STEP].copy()
            if window.max() <= self._silence_level:
                if self._silent_frame is not None:
                    # The same input as the frame cached: the same pixels, without the model.
                    picture = av.VideoFrame.from_ndarray(self._silent_frame, format="yuv420p")
                    self._make_ready(frame, picture)
                    self.silent += 1
                    frame += 1
                    continue
                window[:] = -MAX_ABS  # every silent window the same: digital silence's
                self._silent_pending.add(frame)
            if due <= time.monotonic() or not self._scheduler.submit(self, frame, window, due):
                self.skipped += 1
                self._silent_pending.discard(frame)
            frame += 1
        self._next_frame = frame
        keep = window_start(frame, alignment) - self._mel_base
        if keep > 0:
            self._mel = self._mel[:, keep:]
            self._mel_base += keep

    def _track_speaking(self, samples: np.ndarray, start: int) -> None:
        """Speaking events, and where on the timeline the sound was (`_quiet_around_output`)."""
        if len(samples) == 0:
            return
        loud = float(np.sqrt(np.mean(samples**2))) > SPEECH_RMS
        now = self.clock.now()
        if loud:
            self._loud.append((start, start + len(samples)))
            self._quiet_since = now
            if not self._speaking:
                self._speaking = True
                self._send({"type": "speaking", "speaking": True, "at_ms": round(now * 1000)})
        elif self._speaking and now - self._quiet_since > SPEECH_HANGOVER:
            self._speaking = False
            self._send({"type": "speaking", "speaking": False, "at_ms": round(now * 1000)})

    # -- called by the scheduler (FrameSink) ---------------------------------------------

    def compose(self, mouth: np.ndarray) -> av.VideoFrame:
        """Paste the mouth into the photo; runs on the scheduler's thread."""
        return self._to_video_frame(self._blender.paste(self._photo.image, mouth))

    def deliver(self, index: int, frame: av.VideoFrame, infer_seconds: float) -> None:
        self._infer_ms.append(infer_seconds * 1000)
        if index in self._silent_pending:  # the floor window's mouth, whenever it comes
            self._silent_pending.clear()
            self._silent_frame = frame.to_ndarray()
        if index in self._rest:  # made from audio that was cleared meanwhile
            return
        if index < self._sent_upto:  # too late: its slot went out as a repeat
            self.skipped += 1
            return
        self.generated += 1
        self._make_ready(index, frame)

    def _make_ready(self, index: int, frame: av.VideoFrame) -> None:
        """Keep a finished frame for its turn, and only the newest MAX_READY: no sender may
        be pulling (an ingest with no viewer)."""
        self._ready[index] = frame
        while len(self._ready) > MAX_READY:
            del self._ready[min(self._ready)]

    def drop(self, index: int) -> None:
        self.skipped += 1
        self._silent_pending.discard(index)

    @staticmethod
    def _to_video_frame(image: np.ndarray) -> av.VideoFrame:
        # Converted here, off the event loop, so the encoder gets what it encodes; by OpenCV,
        # which releases the GIL and took a quarter of swscale's time (0.09 ms against 0.42 for
        # 512x512, same fidelity). Video frames have even sizes (`fit_video`), as I420 needs.
        i420 = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), np.uint8)
        return av.VideoFrame.from_ndarray(i420, format="yuv420p")

    # -- called by the tracks -------------------------------------------------------------

    def frame_for(self, index: int, sent_at: float) -> av.VideoFrame:
        """The frame that shows `index`, stamped with its time; every receiver asking for
        the same index (or, a little behind, an older one) gets the one already handed out,
        which is counted once."""
        if index <= self._shown_index:
            return self._last_frame
        self._shown_index = index
        self._sent_upto = index + 1
        if self.pushed is not None:
            for event in self.pushed.playback_events((index + 1) * SAMPLES_PER_VIDEO_FRAME):
                self._send(event)
        frame = self._ready.pop(index, None)
        for stale in [k for k in self._ready if k < index]:
            del self._ready[stale]
        arrival = self._arrival_of(index * SAMPLES_PER_VIDEO_FRAME)
        fresh = frame is not None and index not in self._rest
        if index in self._rest:
            # Its audio was cleared: the resting face, in a frame of its own (with its own
            # pts) copied from the one made at the start.
            resting = self._resting.to_ndarray()
            frame = self._last_frame = av.VideoFrame.from_ndarray(resting, format="yuv420p")
            self._repeat_run = 0
            self._shown_arrival = None
        elif frame is None:
            self.repeated += 1
            self._repeat_run += 1
            self.longest_repeat_run = max(self.longest_repeat_run, self._repeat_run)
            frame = self._last_frame
            if self.viewers:
                # Another sender may still be encoding the previous frame object, its pts
                # with it: the repeat goes out as a copy with a pts of its own.
                frame = self._last_frame = av.VideoFrame.from_ndarray(
                    frame.to_ndarray(), format="yuv420p"
                )
        else:
            self._repeat_run = 0
            self._last_frame = frame
            self._shown_arrival = arrival
        self.delivered += 1
        # The lag is the age of the mouth on screen: it stands for the audio at the start of
        # the frame it was inferred for. A fresh frame's age is the delay; a repeat shows an
        # older mouth, 40 ms older for each frame it lags behind. (The resting face, before
        # the first mouth or after a clear_buffer, stands for no audio.)
        if self._shown_arrival is not None:
            age = sent_at - self._shown_arrival
            self._lags.append(age)
            self._metrics.frame_sent(fresh, age)
        frame.pts = index * VIDEO_PTS_STEP
        frame.time_base = VIDEO_TIME_BASE
        self._apply_bitrate()
        return frame

    def audio_for(self, start: int, count: int) -> np.ndarray:
        """`count` samples of returned audio from `start`, read once for every receiver."""
        chunk = self._audio_chunks.get(start)
        if chunk is None:
            if self._timeline.position("out") < start:
                self._timeline.read("out", start)  # skipped ahead: discard what was missed
            if self._timeline.position("out") > start:  # read already for a later chunk
                return np.zeros(count, np.float32)
            chunk = self._audio_chunks[start] = self._timeline.read("out", start + count)
            for old in [k for k in self._audio_chunks if k < start - AUDIO_CHUNKS_KEPT * count]:
                del self._audio_chunks[old]
        return chunk

    def _arrival_of(self, sample: int) -> float:
        """When the audio at `sample` arrived, or when it was due if it never did."""
        while self._arrivals and self._arrivals[0][0] <= sample:
            self._arrivals.popleft()
        nominal = self.clock.origin + sample / SAMPLE_RATE
        if self._arrivals and self._arrivals[0][0] - sample < SAMPLE_RATE // 10:
            return self._arrivals[0][1]
        return nominal

    def _apply_bitrate(self) -> None:
        """Set the encoder's starting bitrate once aiortc has made the encoder.

        aiortc exposes no API for it and clamps it to the codec's range (VP8 0.25-1.5 Mbit/s,
        H.264 0.5-3 Mbit/s); later the receiver's REMB estimate steers it.
        """
        for sender in list(self._video_senders):
            encoder = getattr(sender, "_RTCRtpSender__encoder", None)
            if encoder is not None and hasattr(encoder, "target_bitrate"):
                encoder.target_bitrate = self.options.bitrate
                self._video_senders.remove(sender)

    # -- reporting and lifetime -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        lags = sorted(self._lags)
        p95 = lags[min(len(lags) - 1, len(lags) * 95 // 100)] if lags else None
        return {
            "delivered": self.delivered,
            "generated": self.generated,
            "repeated": self.repeated,
            "skipped": self.skipped,
            "silent": self.silent,
            "audio_missing": self.audio_missing,
            "jitter_ms": round(self.jitter.value * 1000),
            "delay_ms": round(self.clock.delay * 1000),
            "lag_ms": round(lags[len(lags) // 2] * 1000) if lags else None,
            "lag_p95_ms": round(p95 * 1000) if p95 is not None else None,
            "longest_repeat_run": self.longest_repeat_run,
            "inference_ms": round(float(np.mean(self._infer_ms)), 1) if self._infer_ms else None,
            "speaking": self._speaking,
        }

    def _send(self, message: dict[str, Any]) -> None:
        channel = self._events
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(message))

    async def _report(self) -> None:
        """A stats message each second on the `events` channel."""
        previous = self.stats()
        while True:
            await asyncio.sleep(1.0)
            current = self.stats()
            self._send(
                {
                    "type": "stats",
                    "delivered_fps": current["delivered"] - previous["delivered"],
                    "generated_fps": current["generated"] - previous["generated"],
                    "silent_fps": current["silent"] - previous["silent"],
                    "dropped": current["repeated"],
                    "lag_ms": current["lag_ms"],
                    "lag_p95_ms": current["lag_p95_ms"],
                    "longest_repeat_run": current["longest_repeat_run"],
                    "inference_ms": current["inference_ms"],
                    "jitter_ms": current["jitter_ms"],
                    "delay_ms": current["delay_ms"],
                    "engine": self._scheduler.engine.name,
                }
            )
            previous = current

    async def _watch(self) -> None:
        """Once a second: has the connection come up in time, is the peer still there (any
        packet from it counts: RTCP reports on the video it receives, microphone RTP), and
        has media come lately? A killed peer sends no DTLS close, and ICE's own consent checks
        take 30 s to notice; this frees its slot within `peer_timeout`."""
        created = heard = time.monotonic()
        received = 0
        while True:
            await asyncio.sleep(WATCH_PERIOD)
            now = time.monotonic()
            count = await self._packets_received()
            if count != received:
                received, heard = count, now
            last_media = max(
                self._microphone.last_media if self._microphone else created,
                self.pushed.last_message if self.pushed else created,
                self._last_control,
            )
            started = self.clock.started.is_set()
            if not started and now - created > CONNECT_TIMEOUT:
                gone, why = True, f"the connection did not come up within {CONNECT_TIMEOUT:g} s"
            elif started and now - heard > self.options.peer_timeout:
                gone, why = True, f"nothing came from the peer for {now - heard:.0f} s"
            else:
                gone = now - last_media > self.options.idle_timeout
                why = f"no media for {now - last_media:.0f} s"
            if gone:
                log.info("session %s: %s, closing", self.id, why)
                await self.close()
                return

    async def _packets_received(self) -> int:
        """Packets that reached the connection's DTLS transport: RTP, RTCP, DTLS and SCTP."""
        stats = await self.pc.getStats()
        return sum(
            getattr(s, "packetsReceived", 0) for s in stats.values() if s.type == "transport"
        )

    async def close(self) -> None:
        """Free everything: tasks, pending frames, tracks, the peer connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            current = asyncio.current_task()
            others = [task for task in self._tasks if task is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            self._tasks.clear()
            self._ready.clear()
            self._scheduler.forget(self)
            self.face = None
            await asyncio.gather(*(viewer.close() for viewer in self.viewers.values()))
            self.viewers.clear()
            for track in self.tracks:
                track.stop()
            await self.pc.close()
        finally:
            await self._on_closed(self)
