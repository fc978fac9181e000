"""A session's microphone audio laid out on the session's own timeline.

Samples are written where their timestamps say they belong, so a lost packet leaves a hole that
reads as silence instead of shifting everything after it. Readers (the mel front end and the
returned audio track) each keep a position; samples behind every reader are dropped and
samples too far ahead are refused, so memory stays bounded whatever the peer sends.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


class AudioTimeline:
    """16 kHz mono float32 samples indexed from the session clock's origin."""

    def __init__(self, readers: tuple[str, ...], max_ahead: int = 10 * SAMPLE_RATE) -> None:
        self._base = 0  # absolute index of _data[0]
        self._data = np.zeros(0, dtype=np.float32)
        self._positions = dict.fromkeys(readers, 0)
        self._max_ahead = max_ahead
        self.written_end = 0  # one past the last sample ever written
        self.late_samples = 0  # arrived after every reader had passed them

    def write(self, start: int, samples: np.ndarray) -> None:
        """Place `samples` at absolute index `start`; parts already read are dropped."""
        end = start + len(samples)
        floor = min(self._positions.values())
        if start < floor:
            self.late_samples += min(end, floor) - start
            samples = samples[max(0, floor - start) :]
            start = max(start, floor)
        if end <= start or end - floor > self._max_ahead:
            return
        needed = end - self._base
        if needed > len(self._data):
            self._data = np.concatenate(
                (self._data, np.zeros(needed - len(self._data), dtype=np.float32))
            )
        self._data[start - self._base : end - self._base] = samples
        self.written_end = max(self.written_end, end)

    def silence_from(self, start: int) -> None:
        """Drop what was written from `start` on: it reads as silence, until written again."""
        self._data[max(0, start - self._base) :] = 0
        self.written_end = min(self.written_end, max(start, self._base))

    def position(self, reader: str) -> int:
        return self._positions[reader]

    def read(self, reader: str, end: int) -> np.ndarray:
        """Samples from the reader's position up to `end`; holes and the future read as 0."""
        start = self._positions[reader]
        if end <= start:
            return np.zeros(0, dtype=np.float32)
        # Readers never fall behind _base (it trails the slowest one), so `have` starts at
        # `start`; it may stop short of `end`, and the rest is silence.
        out = np.zeros(end - start, dtype=np.float32)
        have = self._data[start - self._base : end - self._base]
        out[: len(have)] = have
        self._positions[reader] = end
        self._trim()
        return out

    def _trim(self) -> None:
        floor = min(self._positions.values())
        if floor - self._base > SAMPLE_RATE:  # trim in whole seconds, not on every read
            drop = min(floor - self._base, len(self._data))
            self._data = self._data[drop:]
            self._base += drop
