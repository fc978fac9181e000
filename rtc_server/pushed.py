"""Audio a program pushes, played out at real time as if a microphone had sent it.

A voice agent's speech (TTS) comes faster than real time, in messages of any size, on the
session's `audio` data channel: PCM s16le mono at the rate the session was opened with. It
waits here, at most `max_seconds` of it, and every 20 ms the next 20 ms goes onto the session's
timeline where a microphone's would go (ending now). From there on nothing differs: the mouth
and the returned audio follow on the session's one clock. When nothing waits, nothing is
written: the timeline reads silence and the face rests.

An utterance is what was pushed up to `end_of_segment` (or up to a `clear`, which cuts it).
Its place on the timeline is kept, so the session can tell when its first and last frames
went out (`playback_started`, `playback_finished`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from rtc_server.clock import AUDIO_FRAME_SECONDS
from rtc_server.timeline import SAMPLE_RATE, AudioTimeline

log = logging.getLogger(__name__)

RATES = (16_000, 24_000, 48_000)


class Overfull(Exception):
    """More audio was pushed than the buffer holds; the message says how much was kept."""


@dataclass
class Utterance:
    """An utterance's place on the session timeline (16 kHz samples)."""

    start: int  # where its first sample was played out
    end: int | None = None  # one past its last sample, once it has ended
    started_sent: bool = False  # playback_started has gone out
    finished_sent: bool = False  # playback_finished has gone out


# In the queue of waiting audio, where one utterance ends and the next begins.
END = None


class PushedAudio:
    """The audio waiting to be played out, and the utterances being played."""

    def __init__(
        self,
        rate: int,
        timeline: AudioTimeline,
        session_time: Callable[[], float],
        on_audio: Callable[[int, float], None],
        max_seconds: float,
        on_late: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        if rate not in RATES:
            raise ValueError(f"the pushed audio's rate must be one of {RATES}, got {rate}")
        self.rate = rate
        self._timeline = timeline
        self._session_time = session_time
        self._on_audio = on_audio
        self._on_late = on_late  # how late each part played out was, against its place
        self._max_samples = int(max_seconds * SAMPLE_RATE)
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._odd_byte = b""  # half a sample, left over from a message of odd length
        self._pts = 0
        # 16 kHz float32 chunks, in order, with END between utterances.
        self._waiting: deque[np.ndarray | None] = deque()
        self.waiting = 0  # samples in _waiting
        self._open = False  # audio came since the last END
        self._cursor: int | None = None  # the timeline sample the next played sample goes to
        self.current: Utterance | None = None  # the one being played out
        self.utterances: deque[Utterance] = deque()  # oldest first, for the session to report
        self.last_message = time.monotonic()

    def push(self, data: bytes) -> None:
        """Take a message of PCM; Overfull if the buffer cannot hold it all (the part that
        fits is kept)."""
        self.last_message = time.monotonic()
        data = self._odd_byte + data
        self._odd_byte = data[len(data) & ~1 :]
        pcm = np.frombuffer(data[: len(data) & ~1], "<i2")
        if not len(pcm):
            return
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.rate)
        self._pts += len(pcm)
        resampled = [out.to_ndarray()[0] for out in self._resampler.resample(frame)]
        samples = np.concatenate(resampled).astype(np.float32) if resampled else None
        if samples is None:
            return
        room = max(0, self._max_samples - self.waiting)
        self._keep(samples[:room])
        if len(samples) > room:
            raise Overfull(
                f"the audio buffer holds {self._max_samples / SAMPLE_RATE:g} s and is full: "
                f"{(len(samples) - room) / SAMPLE_RATE:.2f} s of this message were dropped; "
                "push no faster than it plays once the buffer is full"
            )

    def _keep(self, samples: np.ndarray) -> None:
        if len(samples):
            self._waiting.append(samples)
            self.waiting += len(samples)
            self._open = True

    def end_segment(self) -> None:
        """What was pushed so far is one utterance; what comes next begins another."""
        self.last_message = time.monotonic()
        if self._open or self.current is not None:
            self._waiting.append(END)
            self._open = False

    def clear(self) -> Utterance | None:
        """Drop everything still waiting; the utterance cut short, if one was playing."""
        self.last_message = time.monotonic()
        self._waiting.clear()
        self.waiting = 0
        self._open = False
        cut, self.current = self.current, None
        if cut is not None:
            cut.end = self._cursor
        return cut

    async def run(self) -> None:
        """Every 20 ms, play out what is due."""
        while True:
            await asyncio.sleep(AUDIO_FRAME_SECONDS)
            self.play_due()

    def play_due(self) -> None:
        """Write what is due by now onto the timeline, ending now; with nothing waiting, the
        next sound starts where it is played."""
        now = round(self._session_time() * SAMPLE_RATE)
        if self._cursor is None or self.waiting == 0:
            self._end_at_markers()
            self._cursor = now
            return
        due = now - self._cursor
        # What is played now belonged from the cursor on: it is as late as this timer is.
        self._on_late(due / SAMPLE_RATE)
        while due > 0 and self._waiting:
            chunk = self._waiting[0]
            if chunk is END:
                self._end_at_markers()
                continue
            if self.current is None:
                self.current = Utterance(start=self._cursor)
                self.utterances.append(self.current)
            part = chunk[:due]
            if len(part) < len(chunk):
                self._waiting[0] = chunk[len(part) :]
            else:
                self._waiting.popleft()
            self._timeline.write(self._cursor, part)
            self._cursor += len(part)
            self.waiting -= len(part)
            due -= len(part)
        self._end_at_markers()
        self._on_audio(self._cursor, time.monotonic())

    def _end_at_markers(self) -> None:
        """Close the utterance being played at an END that is next in the queue."""
        while self._waiting and self._waiting[0] is END:
            self._waiting.popleft()
            if self.current is not None:
                self.current.end = self._cursor
                self.current = None

    def playback_events(self, shown_end: int) -> list[dict[str, Any]]:
        """The playback events due now that the frames showing the timeline up to
        `shown_end` (a sample) have gone out: an utterance started when its first frame did,
        finished when its last did."""
        events: list[dict[str, Any]] = []
        for utterance in self.utterances:
            if not utterance.started_sent and shown_end > utterance.start:
                utterance.started_sent = True
                events.append({"type": "playback_started"})
            end = utterance.end
            if end is not None and not utterance.finished_sent and shown_end >= end:
                utterance.finished_sent = True
                events.append(_finished(utterance, end, False))
        while self.utterances and self.utterances[0].finished_sent:
            self.utterances.popleft()
        return events

    def interrupt(self, shown_end: int) -> list[dict[str, Any]]:
        """Drop what waits (clear_buffer). Every utterance not yet reported finishes now: cut
        short at the point its frames had reached, or whole if they had all gone out; with
        none playing, one playback_finished at 0 all the same, as agents wait for it."""
        self.clear()
        events = []
        for utterance in self.utterances:
            if utterance.finished_sent:
                continue
            end = utterance.end if utterance.end is not None else utterance.start
            events.append(_finished(utterance, min(shown_end, end), shown_end < end))
        self.utterances.clear()
        return events or [
            {"type": "playback_finished", "playback_position": 0.0, "interrupted": True}
        ]


def _finished(utterance: Utterance, shown_end: int, interrupted: bool) -> dict[str, Any]:
    """playback_finished, with how much of the utterance was shown, in seconds."""
    position = max(0, shown_end - utterance.start) / SAMPLE_RATE
    return {
        "type": "playback_finished",
        "playback_position": round(position, 3),
        "interrupted": interrupted,
    }
