"""How long a session waits for late microphone audio: measured, not assumed.

Each audio frame from the peer has a place on the timeline (its RTP timestamp) and an arrival
time; `Microphone` reports how long after its place each one's first sample arrived: the
packet's length (20 ms from a browser) and the network's jitter. The allowance is a high
percentile of that over the last few seconds plus a margin, within bounds: it grows at once when
the network gets worse (a frame whose audio is not there in time goes ahead with silence in it)
and shrinks slowly when it gets better (so that one quiet moment does not undo it). On loopback
a microphone's settles a little above a packet's length and the margin (about 33 ms; 38 to 43
with the benchmark's peers on the same two cores). The session's delay follows it (see
`Session._adapt_delay`).
"""

from __future__ import annotations

from collections import deque

import numpy as np

# Seconds: what a loaded machine's scheduling adds with no network at all (pushed audio, whose
# frames are placed as they come, has no packet length on top).
FLOOR = 0.01
CEILING = 0.15  # beyond this, waiting costs more than the audio's missing bits
MARGIN = 0.01
PERCENTILE = 95
WINDOW = 250  # frames: 5 s of 20 ms packets
SETTLE = 50  # frames measured (1 s) before the measure replaces the starting guess
SHRINK_PER_FRAME = 0.0001  # 5 ms a second at 50 frames a second


class JitterAllowance:
    """Seconds to wait beyond a frame's audio before it goes ahead with what has come."""

    def __init__(self, initial: float) -> None:
        self.value = initial
        self._late: deque[float] = deque(maxlen=WINDOW)

    def observe(self, late: float) -> None:
        """A frame arrived `late` seconds after its place on the timeline."""
        self._late.append(max(0.0, late))
        if len(self._late) < SETTLE:
            return
        target = float(np.percentile(self._late, PERCENTILE)) + MARGIN
        target = min(CEILING, max(FLOOR, target))
        if target > self.value or len(self._late) == SETTLE:  # the first measure replaces
            # the guess it started with
            self.value = target
        else:
            self.value = max(target, self.value - SHRINK_PER_FRAME)
