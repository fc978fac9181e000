"""The Pipecat service in a real Pipecat pipeline, run in-process against a real server: TTS
audio in, the face and its audio out in sync, and an interruption that stops both."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from client.pipecat_service import LipSyncVideoService
from signaling.server import SESSIONS
from tests.measure import AT_REST, MOVING, at_rate, mouth_blocks
from tests.servers import serving

pytestmark = pytest.mark.slow

RATE = 24_000  # the pipeline's output rate, as most TTS services send


class Sink(FrameProcessor):
    """The end of the pipeline, where a transport would be: what arrives, and when."""

    def __init__(self, mouth: Any) -> None:
        super().__init__()
        self._mouth = mouth
        self.images: list[tuple[float, np.ndarray, tuple[int, int]]] = []
        self.audio: list[tuple[float, TTSAudioRawFrame]] = []
        self.others: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            width, height = frame.size
            rgb = np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)
            self.images.append((now, self._mouth(rgb.mean(axis=2)), frame.size))
        elif isinstance(frame, TTSAudioRawFrame):
            self.audio.append((now, frame))
        else:
            self.others.append(frame)
        await self.push_frame(frame, direction)


def _tts(samples: np.ndarray) -> list[Frame]:
    """An utterance as a TTS service sends it: started, chunks of 0.1 s, stopped."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    step = RATE // 10
    chunks = [
        TTSAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=RATE, num_channels=1)
        for i in range(0, len(pcm), step)
    ]
    return [TTSStartedFrame(), *chunks, TTSStoppedFrame()]


async def test_a_pipecat_pipeline_gets_the_face_in_sync_and_interrupts_it(
    speech_16k: np.ndarray,
) -> None:
    speech = at_rate(speech_16k, RATE)
    seconds = len(speech) / RATE
    async with serving() as (app, url), aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/avatars/default") as response:
            avatar = await response.json()
        sink = Sink(mouth_blocks(avatar))
        service = LipSyncVideoService(url)
        worker = PipelineWorker(
            Pipeline([service, sink]),
            params=PipelineParams(audio_out_sample_rate=RATE),
            cancel_on_idle_timeout=False,
            enable_rtvi=False,
        )
        marks: dict[str, float] = {}

        async def speak() -> None:
            while len(sink.images) < 40:  # the face at rest, for reference
                await asyncio.sleep(0.05)
            marks["first"] = time.monotonic()
            for frame in _tts(speech):
                await worker.queue_frame(frame)
            await asyncio.sleep(seconds + 1.5)
            marks["second"] = time.monotonic()
            for frame in _tts(np.concatenate([speech, speech])):
                await worker.queue_frame(frame)
            while len([t for t, _ in sink.audio if t > marks["second"]]) < 75:  # 1.5 s of it
                await asyncio.sleep(0.01)
            marks["interrupted"] = time.monotonic()
            await worker.queue_frame(InterruptionFrame())
            await asyncio.sleep(1.5)
            await worker.queue_frame(EndFrame())

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.gather(runner.run(), speak())
        assert not app[SESSIONS].sessions  # the service ended its session

    # The face: 25 fps of the avatar's size.
    times = np.array([t for t, _, _ in sink.images])
    assert {size for _, _, size in sink.images} == {(avatar["width"], avatar["height"])}
    steady = times[(times > times[0] + 1) & (times < times[-1] - 0.5)]
    assert (len(steady) - 1) / (steady[-1] - steady[0]) > 23

    # The first utterance's audio came back whole, at 24 kHz, while the mouth moved.
    first = [(t, f) for t, f in sink.audio if t < marks["second"]]
    assert all(f.sample_rate == RATE and f.num_channels == 1 for _, f in first)
    returned = sum(f.num_frames for _, f in first) / RATE
    assert abs(returned - seconds) < 0.15, (returned, seconds)
    crops = np.stack([m for _, m, _ in sink.images])
    rest = np.median(crops[(times > times[0] + 0.4) & (times < marks["first"])], axis=0)
    moved = np.abs(crops - rest).mean(axis=(1, 2))
    loud = [t for t, f in first if np.abs(np.frombuffer(f.audio, np.int16)).max() > 1600]
    speaking = (times > loud[0]) & (times < loud[-1])
    resting = (times > times[0] + 0.4) & (times < marks["first"])
    assert moved[speaking].mean() > 4 * max(moved[resting].mean(), 0.5)
    first_move = times[np.argmax((times > marks["first"]) & (moved > MOVING))]
    assert abs(first_move - loud[0]) < 0.15, (first_move, loud[0])  # in sync

    # The interruption: no audio after it, and the face at rest within 100 ms and a frame.
    interrupted = marks["interrupted"]
    assert not [t for t, _ in sink.audio if t > interrupted + 0.02]
    after = (times > interrupted + 0.14) & (times < interrupted + 1.5)
    assert after.sum() > 25 and moved[after].max() < AT_REST, moved[after]
    assert any(isinstance(f, InterruptionFrame) for f in sink.others)
