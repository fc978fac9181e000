"""The media path's parts on their own: timeline, microphone placement, scheduler, frames."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from rtc_server.microphone import Microphone
from rtc_server.scheduler import ACTIVE_FOR, RECENT_BATCHES, Capacity, InferenceScheduler
from rtc_server.timeline import AudioTimeline
from wav2lip.audio import melspectrogram, samples_needed


def test_timeline_places_by_index_and_reads_holes_as_silence() -> None:
    timeline = AudioTimeline(("a", "b"))
    timeline.write(0, np.ones(100, np.float32))
    timeline.write(200, np.full(100, 2, np.float32))  # 100..200 was lost
    got = timeline.read("a", 350)
    assert np.all(got[:100] == 1) and np.all(got[100:200] == 0) and np.all(got[200:300] == 2)
    assert np.all(got[300:] == 0)  # the future reads as silence too
    # Reader "b" still sees everything: samples are kept until every reader has passed.
    assert np.array_equal(timeline.read("b", 350), got)
    # Audio arriving after both readers passed it is counted late and dropped.
    timeline.write(300, np.ones(100, np.float32))
    assert timeline.late_samples == 50
    assert np.all(timeline.read("a", 400) == 1)


def test_timeline_memory_is_bounded() -> None:
    timeline = AudioTimeline(("a",), max_ahead=16000)
    timeline.write(10 * 16000, np.ones(10, np.float32))  # absurdly far ahead: refused
    assert timeline.written_end == 0
    for second in range(30):
        timeline.write(second * 16000, np.ones(16000, np.float32))
        timeline.read("a", (second + 1) * 16000)
    assert len(timeline._data) <= 2 * 16000


class _FakeTrack:
    """Yields 48 kHz stereo frames with given RTP timestamps, then ends."""

    def __init__(self, stamps: list[int], level: float = 0.5) -> None:
        self._stamps = list(stamps)
        self._level = level

    async def recv(self) -> av.AudioFrame:
        if not self._stamps:
            raise MediaStreamError
        pcm = np.full((1, 960 * 2), int(self._level * 32767), np.int16)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = self._stamps.pop(0)
        frame.time_base = Fraction(1, 48000)
        return frame


async def _run_microphone(stamps: list[int], session_time) -> tuple:
    timeline = AudioTimeline(("r",))
    ends = []
    microphone = Microphone(
        _FakeTrack(stamps), timeline, session_time, lambda end, _: ends.append(end)
    )
    await microphone.run()
    return timeline, microphone, ends


async def test_microphone_places_by_timestamp_and_lost_packets_become_silence() -> None:
    base = (1 << 32) - 960 * 3  # wraps around 2**32 during the run
    stamps = [(base + i * 960) % (1 << 32) for i in range(10) if i != 5]  # packet 5 lost
    # On time: each packet arrives as its 20 ms have been captured.
    arrivals = iter([0.02] + [0.02 * (i + 1) for i in range(10) if i != 5])
    timeline, microphone, ends = await _run_microphone(stamps, lambda: next(arrivals))
    assert microphone.frames == 9
    audio = timeline.read("r", 10 * 320)
    per_frame = audio.reshape(10, 320)
    loud = np.abs(per_frame[:, 100:]).mean(axis=1) > 0.3  # skip the resampler's ramp-in
    assert loud.tolist() == [True] * 5 + [False] + [True] * 4
    assert ends[-1] == pytest.approx(10 * 320, abs=40)


async def test_microphone_reanchors_when_the_first_packet_was_late() -> None:
    """A first packet held up 0.5 s must not add 0.5 s of lag to the whole session."""
    # Packet 0 arrives 0.5 s into the session, packets 1..3 right behind it (they had queued
    # behind it), then one every 20 ms.
    clock = iter([0.5] * 5 + [0.5 + 0.02 * i for i in range(1, 20)])
    stamps = [i * 960 for i in range(20)]
    _, microphone, ends = await _run_microphone(stamps, lambda: next(clock))
    # Packets 1..3 arrived together right after packet 0: the anchor moved back, to where
    # packet 0 began (a packet arrives once its last sample was captured).
    assert microphone.first_index == 0.5 * 16000 - 4 * 320
    # Each packet ends where it arrived: no packet's length is added to the lag.
    assert ends[-1] == pytest.approx((0.5 + 0.02 * 16) * 16000, abs=40)


def test_samples_needed_matches_the_mel_frames_a_window_reads() -> None:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000 * 2).astype(np.float32)
    full = melspectrogram(audio)
    for frame, alignment in [(f, a) for f in (0, 1, 5, 17) for a in ("official", "training")]:
        need = samples_needed(frame, alignment)
        start = max(0, int((frame - (alignment == "training")) * 3.2))
        window = melspectrogram(audio[:need])[:, start : start + 16]
        # With just `need` samples, the frame's last mel frame is already final.
        assert np.abs(window - full[:, start : start + 16]).max() < 1e-4


class _Sink:
    def __init__(self) -> None:
        self.face = object()
        self.closed = False
        self.delivered: list[int] = []
        self.dropped: list[int] = []

    def compose(self, mouth: np.ndarray) -> np.ndarray:
        return mouth

    def deliver(self, index: int, frame: np.ndarray, infer_seconds: float) -> None:
        self.delivered.append(index)

    def drop(self, index: int) -> None:
        self.dropped.append(index)


class _SlowEngine:
    name = "slow"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def prepare(self, face_input: np.ndarray) -> object:
        return object()

    def infer(self, face, mels: np.ndarray) -> np.ndarray:
        self.batches.append(len(mels))
        time.sleep(0.05 * len(mels))
        return np.zeros((len(mels), 96, 96, 3), np.uint8)


async def test_scheduler_runs_earliest_due_first_and_drops_what_cannot_make_it() -> None:
    engine = _SlowEngine()
    scheduler = InferenceScheduler(engine, max_batch=2)
    scheduler.start()
    await asyncio.sleep(1.2)  # the warm-up runs each batch size, then measures 50 ms a frame
    assert scheduler.seconds_per_frame == pytest.approx(0.05, abs=0.01)
    engine.batches.clear()
    a, b = _Sink(), _Sink()
    mel = np.zeros((80, 16), np.float32)
    with scheduler._cond:  # the worker waits while the queue is filled
        now = time.monotonic()
        scheduler.seconds_per_frame = 0.001  # believed fast: everything is queued...
        for i in range(6):
            assert scheduler.submit(a, i, mel, now + 0.12 + 0.04 * i)
            assert scheduler.submit(b, i, mel, now + 0.12 + 0.04 * i)
        assert scheduler.submit(a, 99, mel, now - 1)  # already late
        scheduler.seconds_per_frame = 0.05  # ...then found slow
    await asyncio.sleep(0.8)
    scheduler.stop()
    assert 99 in a.dropped and 99 not in a.delivered
    assert max(engine.batches) <= 2
    # Twelve frames at 50 ms each cannot all make it in time: some are dropped, not queued.
    assert a.dropped and b.dropped
    for sink in (a, b):
        assert sink.delivered == sorted(sink.delivered)  # earliest due first
        assert set(sink.delivered).isdisjoint(sink.dropped)
    # Frames of both sessions were served: the shared device is fair by due time.
    assert a.delivered and b.delivered


class _FastEngine(_SlowEngine):
    def infer(self, face, mels: np.ndarray) -> np.ndarray:
        self.batches.append(len(mels))
        return np.zeros((len(mels), 96, 96, 3), np.uint8)


async def test_a_lone_frame_is_not_held_back_to_fill_a_batch() -> None:
    """With room for a batch of 16 and a deadline a second away, one session's frame still
    runs within a few milliseconds: it leaves time for compositing and delivery."""
    scheduler = InferenceScheduler(_FastEngine(), max_batch=16)
    scheduler.start()
    await asyncio.sleep(0.2)  # warm-up
    sink = _Sink()
    submitted = time.monotonic()
    assert scheduler.submit(sink, 0, np.zeros((80, 16), np.float32), submitted + 1.0)
    while not sink.delivered and time.monotonic() - submitted < 1.0:
        await asyncio.sleep(0.002)
    waited = time.monotonic() - submitted
    scheduler.stop()
    assert sink.delivered == [0]
    assert waited < 0.1


async def test_an_overloaded_device_is_shared_evenly() -> None:
    """Two sessions asking 25 fps each of a device that makes about 25: each gets about half,
    with the skipped frames spread out rather than in runs."""
    engine = _SlowEngine()  # 50 ms a frame: 20 fps
    scheduler = InferenceScheduler(engine, max_batch=1)
    scheduler.seconds_per_frame = 0.05
    a, b = _Sink(), _Sink()
    accepted = {id(a): [], id(b): []}
    mel = np.zeros((80, 16), np.float32)
    start = time.monotonic()
    for i in range(50):
        for sink in (a, b):
            if scheduler.submit(sink, i, mel, start + 10):
                accepted[id(sink)].append(i)
    share = 0.9 / (0.05 * 25 * 2)  # HEADROOM over two sessions' demand
    for frames in accepted.values():
        assert abs(len(frames) - 50 * share) <= 1
        assert max(np.diff(frames)) <= 3  # never more than two skipped in a row
    scheduler.forget(a)
    assert all(job.sink is b for job in scheduler._heap)


def test_a_passing_slow_batch_is_not_lost_capacity() -> None:
    """One slow frame in ten (another process took a core for a moment) leaves the device's
    measured speed where it is, so one session gets every frame; a lasting slowdown moves it
    within a couple of seconds."""
    capacity = Capacity([0.03])
    for i in range(100):
        capacity.add(1, 0.09 if i % 10 == 0 else 0.03)
    assert capacity.seconds_per_frame == pytest.approx(0.03)
    scheduler = InferenceScheduler(_FastEngine(), max_batch=1)
    scheduler._capacity = capacity
    sink, mel = _Sink(), np.zeros((80, 16), np.float32)
    due = time.monotonic() + 10
    assert all(scheduler.submit(sink, i, mel, due) for i in range(50))  # none skipped
    for _ in range(RECENT_BATCHES // 2 + 1):
        capacity.add(1, 0.05)
    assert capacity.seconds_per_frame == pytest.approx(0.05)
    # Now 25 fps at 50 ms a frame is more than the device makes: frames are skipped, evenly.
    accepted = [i for i in range(50) if scheduler.submit(sink, 50 + i, mel, due)]
    assert abs(len(accepted) - 50 * 0.9 / (0.05 * 25)) <= 1  # HEADROOM of its 20 fps
    assert max(np.diff(accepted)) == 2


class _PairingEngine(_SlowEngine):
    """10 ms for one frame, 16 ms for two (a CPU gains from pairs), times `slowdown`."""

    slowdown = 1.0

    def infer(self, face, mels: np.ndarray) -> np.ndarray:
        self.batches.append(len(mels))
        time.sleep((0.004 + 0.006 * len(mels)) * self.slowdown)
        return np.zeros((len(mels), 96, 96, 3), np.uint8)


def test_capacity_scales_each_batch_size_by_the_slowdown_of_any() -> None:
    capacity = Capacity([0.010, 0.016])
    assert capacity.seconds_per_frame == pytest.approx(0.008)  # a full batch's part
    for _ in range(RECENT_BATCHES):
        capacity.add(1, 0.020)  # single frames, twice as slow as alone
    assert capacity.batch_seconds(1) == pytest.approx(0.020)
    assert capacity.batch_seconds(2) == pytest.approx(0.032)
    assert capacity.seconds_per_frame == pytest.approx(0.016)
    capacity.restart(2, 0.016)  # a probe: as fast as alone again, at once
    assert capacity.seconds_per_frame == pytest.approx(0.008)


async def test_batches_that_do_not_fill_still_measure_the_device() -> None:
    """Room for two frames, but one session's frames come one at a time. When other work
    slows the device threefold, the measure follows (judged on full batches alone, it stayed
    at the warm-up's, and frames were taken that could not make their time)."""
    engine = _PairingEngine()
    scheduler = InferenceScheduler(engine, max_batch=2)
    scheduler.start()
    await scheduler.warmed_up()
    alone = scheduler.seconds_per_frame
    assert alone == pytest.approx(0.008, abs=0.003)
    engine.slowdown = 3.0
    sink, mel = _Sink(), np.zeros((80, 16), np.float32)
    for i in range(RECENT_BATCHES):
        scheduler.submit(sink, i, mel, time.monotonic() + 1.0)
        await asyncio.sleep(0.04)
    scheduler.stop()
    assert 2 not in engine.batches[-RECENT_BATCHES:]
    assert scheduler.seconds_per_frame > 2 * alone


async def test_a_device_judged_too_slow_is_measured_again() -> None:
    """A slow spell (another process took the cores) left the device's measure above every
    frame's slack. Judged by it alone, every frame would be dropped as late, and with nothing
    run the measure would never change: the session would show no new mouth again. Once
    nothing has run for PROBE_AFTER, a frame that can still make its time runs anyway, and
    the measure follows what it took."""
    scheduler = InferenceScheduler(_FastEngine(), max_batch=1)
    scheduler.start()
    await scheduler.warmed_up()
    scheduler.seconds_per_frame = 1.0
    sink, mel = _Sink(), np.zeros((80, 16), np.float32)
    for i in range(100):  # 4 s of one session's frames, each due 0.1 s after it is ready
        scheduler.submit(sink, i, mel, time.monotonic() + 0.1)
        await asyncio.sleep(0.04)
    await asyncio.sleep(0.1)
    scheduler.stop()
    assert scheduler.seconds_per_frame < 0.01
    # The last second: every frame made (but one or two, should this machine stall).
    assert len([i for i in sink.delivered if i >= 75]) >= 23, sink.delivered


async def test_microphone_follows_a_drifting_sender_clock() -> None:
    """A sender whose clock runs 1% slow: its frames arrive ever later than their stamps say.
    Without correction the audio would be read as silence before it comes; with it, the
    placement stays within a frame or two of arrival."""
    frames = 600
    stamps = [i * 960 for i in range(frames)]
    arrivals = iter([0.0] + [i * 0.02 * 1.01 for i in range(frames)])
    _, microphone, ends = await _run_microphone(stamps, lambda: next(arrivals))
    arrived_end = (frames - 1) * 0.02 * 1.01 * 16000
    assert abs(ends[-1] - arrived_end) <= 2 * 320
    # Uncorrected, the last frame would sit 1% of 12 s = 120 ms before its arrival.
    assert microphone.first_index - (-320) > 1000  # moved from where the first packet began


async def test_microphone_recovers_from_a_start_stalled_longer_than_the_anchoring() -> None:
    """The server stalled for 1.5 s as the session began: 75 packets were read at once. The
    anchoring second fixes 50 of them; the rest of the hold-up must leave the lag within a
    couple of seconds, not stay in it for minutes."""
    frames = 400
    stamps = [i * 960 for i in range(frames)]
    arrivals = iter([1.5] * 76 + [(i + 1) * 0.02 for i in range(75, frames)])
    _, microphone, ends = await _run_microphone(stamps, lambda: next(arrivals))
    assert abs(microphone.first_index) <= 320  # back where the peer's first sample belongs
    arrived_end = frames * 0.02 * 16000
    assert abs(ends[-1] - arrived_end) <= 320


async def test_a_session_in_silence_leaves_its_share_to_the_one_that_speaks() -> None:
    """Two sessions on a device that makes 20 frames a second: while one is silent (its frames
    are its cached silent mouth, none submitted) the other gets the device's whole capacity,
    not half of it."""
    scheduler = InferenceScheduler(_SlowEngine(), max_batch=1)
    scheduler.seconds_per_frame = 0.05
    speaking, silent = _Sink(), _Sink()
    mel = np.zeros((80, 16), np.float32)
    due = time.monotonic() + 10
    assert scheduler.submit(silent, 0, mel, due)  # its last word
    await asyncio.sleep(ACTIVE_FOR + 0.05)  # then silence
    accepted = [i for i in range(50) if scheduler.submit(speaking, i, mel, due)]
    assert abs(len(accepted) - 50 * 0.9 / (0.05 * 25)) <= 1, len(accepted)  # not halved
    assert scheduler.submit(silent, 1, mel, due)  # it speaks again: they share
    accepted = [i for i in range(50, 100) if scheduler.submit(speaking, i, mel, due)]
    assert abs(len(accepted) - 50 * 0.9 / (0.05 * 25 * 2)) <= 1, len(accepted)
