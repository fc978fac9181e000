"""One inference scheduler per device, shared by every session on it.

Sessions submit frame jobs (a mel window and the time the frame is due on the wire). A single
worker thread takes the ready jobs of all sessions, earliest due first, runs them as one batch
through the engine, composites each mouth into its session's photo (on a few threads at once:
with many sessions on a GPU, compositing outweighs inference), and hands the finished frames
back to the event loop. A job that could no longer finish before it is due (by the device's
measured speed; when that has dropped frames for PROBE_AFTER with nothing run, one frame runs
anyway, to measure it again) is dropped instead of run: the session repeats its previous
frame and counts the drop, so when the device is overloaded lag stays put and only the frame
rate of new mouths falls.

When the sessions ask for more frames than the device makes, each session gets an equal share,
and within a session the frames skipped are spread out (a credit per session, topped up by its
share with every frame: a frame runs when the credit reaches one), so an overloaded device shows
as a slightly lower frame rate everywhere, not as some sessions or moments frozen.

An engine that fails to warm up, or fails MAX_FAILURES batches in a row (a lost GPU, say), has
failed for good: the scheduler stops, drops what is queued and reports the reason through
`on_failure`, so that sessions end with an error and the process can be restarted, instead of
every frame silently becoming a repeat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from wav2lip.engine import MouthEngine
from wav2lip.threads import name_this_thread

log = logging.getLogger(__name__)

FPS = 25
# The share of the device's measured capacity handed out, keeping some in hand for deadlines.
HEADROOM = 0.9
# A session shares the device while it submits frames: a speaking one every 40 ms. One that
# has submitted none for this long is in silence (or gone) and takes no share.
ACTIVE_FOR = 0.2
WARM_UP_RUNS = 5
BATCH_MARGIN = 0.01  # seconds kept spare when waiting to fill a batch
# The longest a frame waits for others to batch with. Sessions' frames arrive spread over the
# 40 ms frame period; waiting for a full batch until just before a deadline left no time for
# compositing and delivery on a busy server (measured on a GPU: one session lost a frame in
# twenty), while a GPU gains little from bigger batches (with CUDA graphs a batch of 1 takes
# about 1 ms, of 16 about 2 ms).
BATCH_WINDOW = 0.005
COMPOSE_THREADS = min(4, os.cpu_count() or 1)  # OpenCV and PyAV release the GIL as they work
RECENT_BATCHES = 50  # batches the device's speed is judged on: 2 s of one session
# Once frames have been dropped as too late for the device's measure for this long with
# nothing run, a frame that can still make its time runs anyway: the measure is only corrected by
# runs, and a slow spell that pushed it beyond every frame's slack would otherwise stay in it.
PROBE_AFTER = 0.5
# Batches failing in a row before the engine counts as failed for good: one failure may be a
# passing hiccup (its frames show as repeats), three in a row are not.
MAX_FAILURES = 3


class EngineFailure(RuntimeError):
    """The engine failed for good; the message says how."""


class Capacity:
    """How long a batch of each size takes now: its time at the warm-up, alone on the device,
    times how much slower batches have run since (the median, over the last batches of any
    size, of their time over the warm-up's for their size).

    Every batch counts, whatever its size. Judged on full batches only, a device whose batches
    seldom fill (room for several frames, sessions whose frames rarely come together) kept its
    idle warm-up measure while other work slowed it, took frames it could not make in time, and
    threw them away late (two int8 sessions on the 2-core CPU, one inference thread, batches of
    up to four: 7.0 to 8.0 inferred fps each; 12.2 to 14.7 measured this way).

    One ratio for every size, although the batches' times include compositing and the
    warm-up's do not (it weighs more in a small batch): a rough measure, but one that every
    batch keeps current.

    A median, not a running mean: a moment when another process takes a core makes a batch or
    two slow without making the device slower. Judged on a running mean, one session on the
    2-core CPU had a frame in 30 to 100 skipped as if the device were overloaded, although
    none would have been late. A real slowdown moves the median within a second or two.
    """

    def __init__(self, batch_seconds: Sequence[float]) -> None:
        """`batch_seconds[n - 1]`: a batch of n frames, alone on the device."""
        self._alone = list(batch_seconds)
        self._recent: deque[float] = deque([1.0], maxlen=RECENT_BATCHES)
        self._slowdown = 1.0

    @classmethod
    def linear(cls, seconds_per_frame: float, max_batch: int) -> Capacity:
        """Every frame of a batch costing the same: a device known only by one figure."""
        return cls([seconds_per_frame * size for size in range(1, max_batch + 1)])

    def add(self, size: int, seconds: float) -> None:
        """A batch of `size` frames took `seconds`."""
        self._recent.append(seconds / self._alone[size - 1])
        # statistics, not NumPy: np.median's first call imports numpy.ma, 0.1 s on this thread.
        self._slowdown = statistics.median(self._recent)

    def restart(self, size: int, seconds: float) -> None:
        """Judge the device afresh from one batch: the past measure is stale."""
        self._recent.clear()
        self.add(size, seconds)

    def batch_seconds(self, size: int) -> float:
        return self._slowdown * self._alone[size - 1]

    @property
    def seconds_per_frame(self) -> float:
        """A frame's part of a full batch: what each frame costs a busy device."""
        full = len(self._alone)
        return self.batch_seconds(full) / full


class FrameSink(Protocol):
    """The session side of a job: its photo state, compositing, and delivery of results."""

    face: Any
    closed: bool

    def compose(self, mouth: np.ndarray) -> Any:
        """Paste a mouth into the photo (runs on the worker thread)."""

    def deliver(self, index: int, frame: Any, infer_seconds: float) -> None:
        """Receive a finished frame (runs on the event loop)."""

    def drop(self, index: int) -> None:
        """Learn that a frame will not be made (runs on the event loop)."""


@dataclass(order=True)
class FrameJob:
    due: float  # time.monotonic() by which the frame must be on its way
    seq: int
    sink: FrameSink = field(compare=False)
    face: Any = field(compare=False)  # the sink's photo state, held even if the sink closes
    index: int = field(compare=False)
    mel: np.ndarray = field(compare=False)
    queued: float = field(compare=False, default=0.0)  # time.monotonic() when submitted


def _compose(job: FrameJob, mouth: np.ndarray) -> Any:
    return job.sink.compose(mouth)


class InferenceScheduler:
    """Batches the frames of all sessions on one device, earliest due first."""

    def __init__(
        self,
        engine: MouthEngine,
        max_batch: int = 4,
        on_failure: Callable[[str], None] | None = None,
        on_batch: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._on_batch = on_batch  # told each batch's inference seconds (on this thread)
        self.failure: str | None = None  # why the engine failed for good, once it has
        self._on_failure = on_failure  # called on the event loop with that reason
        self._warm: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._heap: list[FrameJob] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._composers = ThreadPoolExecutor(
            COMPOSE_THREADS, "compose", initializer=name_this_thread, initargs=("compose",)
        )
        # How long batches take, inference and compositing together: the device's capacity.
        # It decides what can still make its time, how long to wait to fill a batch, and each
        # session's share (by a frame's part of a full batch: a single frame costs far more
        # than its share of a batch, and judged on that an overloaded device would look slower
        # than it is, wait less to batch, get smaller batches, and spiral down). Measured at
        # start (`_warm_up`) for each batch size, then scaled by every batch run.
        self._capacity = Capacity.linear(0.02, max_batch)
        self._credit: dict[FrameSink, float] = {}
        # When a frame was first dropped as too late since the last batch ran (None: none
        # was): a probe runs once that is PROBE_AFTER ago.
        self._late_since: float | None = None
        # When each session last submitted a frame. A session in silence submits none (its
        # frames are its cached silent mouth): after ACTIVE_FOR it takes no share.
        self._last_submit: dict[FrameSink, float] = {}

    @property
    def seconds_per_frame(self) -> float:
        return self._capacity.seconds_per_frame

    @seconds_per_frame.setter
    def seconds_per_frame(self, value: float) -> None:
        """Judge the device afresh from `value`, as if every frame of a batch cost that."""
        self._capacity = Capacity.linear(value, self.max_batch)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    async def warmed_up(self) -> None:
        """Return once the warm-up has measured the device; EngineFailure if it failed."""
        await asyncio.wrap_future(self._warm)

    @property
    def device_fps(self) -> float:
        """Frames a second the device makes, inference and compositing, as last measured."""
        return 1.0 / self.seconds_per_frame

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._composers.shutdown(cancel_futures=True)

    def submit(self, sink: FrameSink, index: int, mel: np.ndarray, due: float) -> bool:
        """Queue a frame; False if it is skipped to share an overloaded device evenly, or
        because the engine has failed."""
        now = time.monotonic()
        with self._cond:
            if self.failure is not None:
                return False
            self._last_submit[sink] = now
            active = sum(1 for t in self._last_submit.values() if now - t < ACTIVE_FOR)
            share = min(1.0, HEADROOM / (self.seconds_per_frame * FPS * active))
            credit = self._credit.get(sink, 1.0) + share
            if credit < 1.0:
                self._credit[sink] = credit
                return False
            self._credit[sink] = min(credit - 1.0, 1.0)
            job = FrameJob(due, next(self._seq), sink, sink.face, index, mel, now)
            heapq.heappush(self._heap, job)
            self._cond.notify()
        return True

    def forget(self, sink: FrameSink) -> None:
        """A session ended: drop its share and any frames it still has queued."""
        with self._cond:
            self._credit.pop(sink, None)
            self._last_submit.pop(sink, None)
            self._heap = [job for job in self._heap if job.sink is not sink]
            heapq.heapify(self._heap)

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def _wait_for_batch(self) -> None:
        """Wait for a full batch, for at most BATCH_WINDOW after the oldest frame came, and
        only while the earliest frame's deadline still leaves time for a whole batch.

        Frames arrive one at a time, 40 ms apart per session; running each alone would waste
        the batching that makes a device fast.
        """
        while not self._stopped:
            if len(self._heap) >= self.max_batch:
                return
            if not self._heap:
                self._cond.wait()
                continue
            batch_time = self._capacity.batch_seconds(self.max_batch)
            oldest = min(job.queued for job in self._heap)
            until = min(self._heap[0].due - batch_time - BATCH_MARGIN, oldest + BATCH_WINDOW)
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take_batch(self) -> tuple[list[FrameJob], list[FrameJob], bool]:
        """Earliest-due jobs that can still finish in time, those that cannot, and whether
        the batch is a probe (one frame run although the measure says it will be late).

        A batch finishes all at once, so it grows only while the whole batch would still be
        done before its earliest frame is due; later jobs wait for the next batch.
        """
        batch: list[FrameJob] = []
        late: list[FrameJob] = []
        now = time.monotonic()
        while self._heap and len(batch) < self.max_batch:
            job = self._heap[0]
            if job.sink.closed:
                heapq.heappop(self._heap)
                continue
            finish = now + self._capacity.batch_seconds(len(batch) + 1)
            if not batch and finish > job.due:
                since = self._late_since
                if now < job.due and since is not None and now - since >= PROBE_AFTER:
                    return [heapq.heappop(self._heap)], late, True
                self._late_since = now if since is None else since
                late.append(heapq.heappop(self._heap))
            elif batch and finish > batch[0].due:
                break
            else:
                batch.append(heapq.heappop(self._heap))
        return batch, late, False

    def _warm_up(self) -> None:
        """Run each batch size once (an engine may prepare per size, e.g. record a CUDA
        graph), then measure the powers of two and the largest, the best of a few runs each;
        the sizes between are interpolated (measuring all 64 sizes of a large batch on a CPU
        would take minutes)."""
        face = self.engine.prepare(np.zeros((6, 96, 96), np.float32))
        mels = np.zeros((self.max_batch, 80, 16), np.float32)
        for size in range(1, self.max_batch + 1):
            self.engine.infer(face, mels[:size])
        sizes = sorted({*(1 << k for k in range(self.max_batch.bit_length())), self.max_batch})
        measured = []
        for size in sizes:
            best = float("inf")
            for _ in range(WARM_UP_RUNS):
                started = time.monotonic()
                self.engine.infer(face, mels[:size])
                best = min(best, time.monotonic() - started)
            measured.append(max(best, 1e-6))  # never 0, even with a coarse clock
        every = np.interp(np.arange(1, self.max_batch + 1), sizes, measured)
        self._capacity = Capacity([float(seconds) for seconds in every])
        log.info("%s: %.1f ms a frame in batches of %d", self.engine.name,
                 self.seconds_per_frame * 1000, self.max_batch)  # fmt: skip

    def _run(self) -> None:
        name_this_thread("inference")
        try:
            self._warm_up()
        except Exception as exc:
            log.exception("%s: the warm-up failed", self.engine.name)
            self._fail(f"the {self.engine.name} engine failed to warm up: {exc!r}")
            return
        self._warm.set_result(None)
        try:
            self._serve()
        except Exception as exc:
            log.exception("the inference thread failed")
            self._fail(
                str(exc) if isinstance(exc, EngineFailure) else f"inference stopped: {exc!r}"
            )

    def _serve(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._wait_for_batch()
                if self._stopped:
                    return
                batch, late, probe = self._take_batch()
            for job in late:
                self._call(job.sink.drop, job.index)
            if not batch:
                continue
            try:
                self._render(batch, probe)
                failures = 0
            except Exception as exc:
                failures += 1
                log.exception("inference failed for a batch of %d frames", len(batch))
                for job in batch:
                    self._call(job.sink.drop, job.index)
                if failures >= MAX_FAILURES:
                    raise EngineFailure(
                        f"the {self.engine.name} engine failed {failures} batches in a row; "
                        f"the last with {exc!r}"
                    ) from exc

    def _fail(self, reason: str) -> None:
        """Stop for good: drop every queued frame and report why."""
        with self._cond:
            self.failure = reason
            self._stopped = True
            queued, self._heap = self._heap, []
        for job in queued:
            self._call(job.sink.drop, job.index)
        if not self._warm.done():
            self._warm.set_exception(EngineFailure(reason))
        if self._on_failure is not None:
            self._call(self._on_failure, reason)

    def _render(self, batch: Sequence[FrameJob], probe: bool = False) -> None:
        started = time.monotonic()
        self._late_since = None
        faces = [job.face for job in batch]
        mouths = self.engine.infer(faces, np.stack([job.mel for job in batch]))
        batch_seconds = time.monotonic() - started
        if self._on_batch is not None:
            self._on_batch(batch_seconds)
        infer_seconds = batch_seconds / len(batch)
        frames = list(self._composers.map(_compose, batch, mouths))
        seconds = time.monotonic() - started
        if probe and time.monotonic() <= batch[0].due:
            # A frame the measure said would be late made its time: the measure is stale.
            # Judge the device afresh from this run (the next batches soon add to it).
            self._capacity.restart(len(batch), seconds)
        else:
            self._capacity.add(len(batch), seconds)
        for job, frame in zip(batch, frames):
            self._call(job.sink.deliver, job.index, frame, infer_seconds)

    def _call(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        # A closing loop raises: then nobody is waiting for the frame.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)
