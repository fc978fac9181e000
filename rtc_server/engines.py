"""Which engine renders mouths on this worker, and what it needs: its delay and batch size.

Wav2Lip when weights can be had (explicit, cached, or fetched unless offline); the built-in
animator otherwise, which needs none and says so by its name wherever the engine is shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rtc_server.session import JITTER_SECONDS
from wav2lip.animator import Animator
from wav2lip.audio import Alignment, lookahead_seconds
from wav2lip.blend import first_face_row
from wav2lip.checkpoint import load_checkpoint
from wav2lip.engine import Engine, MouthEngine
from wav2lip.weights import GENERATORS, WeightsError, fetch, find_generator

log = logging.getLogger(__name__)

# Beyond the audio a frame needs and the network's jitter, the delay covers the render: a batch
# must fit in it. On a CPU (ONNX Runtime) a Wav2Lip frame takes about 30 ms and batching gains
# little, so frames go one at a time; a GPU gains from batching sessions together.
RENDER_BUDGET = {"animator": 0.06, "wav2lip-gpu": 0.02, "wav2lip": 0.07}
CPU_BATCH = 1
# int8 gains more from a second frame in the batch (16.9 ms a frame alone, 13.8 in pairs, on the
# 2-core CPU; fp32: 26.6 and 24.1). Since its graph lost its fp32 transposed convolutions, on
# one core, 12.6 and 14.4 alone against 12.5 to 18.7 in pairs, within the machine's noise
# (bench/results/int8-plain-joins-2026-12-02.md). Batches of up to four did no better in
# two-session runs before that (docs/benchmarks.md); not measured in sessions since.
INT8_BATCH = 2
GPU_BATCH = 16


def least_delay(alignment: Alignment) -> float:
    """The least delay: the mel window's look-ahead and the jitter allowance."""
    return lookahead_seconds(alignment) + JITTER_SECONDS


@dataclass(frozen=True)
class EngineChoice:
    """Where the weights come from and where the engine runs."""

    checkpoint: Path | None = None
    cache: Path | None = None
    offline: bool = False
    device: str = "auto"
    backend: str = "auto"  # wav2lip.engine.BACKENDS or auto
    threads: int | None = None  # CPU threads for inference; None: PyTorch's own (every core)
    trust_checkpoint: bool = False


def load_engine(choice: EngineChoice) -> MouthEngine:
    """Wav2Lip when weights can be had (explicit, cached, or fetched unless offline); the
    built-in animator otherwise, which needs no weights and says so in health."""
    checkpoint = choice.checkpoint or find_generator(choice.cache)
    if checkpoint is None and not choice.offline:
        try:
            checkpoint = fetch(GENERATORS[0], cache=choice.cache)
        except WeightsError as exc:
            log.warning("could not fetch Wav2Lip weights (%s)", exc)
    if checkpoint is None:
        log.warning(
            "no Wav2Lip weights: running the built-in animator, which warps the photo's mouth "
            "with the loudness of speech; run `lipsync weights fetch` for real lip-sync"
        )
        if choice.backend != "auto":
            log.warning("the animator runs without a backend: --backend %s is unused",
                        choice.backend)  # fmt: skip
        return Animator()
    log.info("Wav2Lip weights: %s", checkpoint)
    if choice.threads is not None:
        # This process's inference: PyTorch's, and ONNX Runtime's (the engine asks PyTorch).
        torch.set_num_threads(choice.threads)
    # Sessions blend with the feathered mask: only the lower face is computed.
    return Engine(
        load_checkpoint(checkpoint, trust_code=choice.trust_checkpoint),
        device=choice.device,
        first_row=first_face_row("feather"),
        backend=choice.backend,
    )


def on_gpu(engine: MouthEngine) -> bool:
    """Wav2Lip on CUDA or Apple's MPS: batches are cheap there."""
    return isinstance(engine, Engine) and engine.device.type != "cpu"


def device_name(engine: MouthEngine) -> str:
    """Where the engine runs, as health shows it: "cpu", "cuda:0", "mps"."""
    return str(engine.device) if isinstance(engine, Engine) else "cpu"


def backend_name(engine: MouthEngine) -> str | None:
    """How Wav2Lip runs ("onnxruntime-int8" is not exact, so health says so); None for the
    animator."""
    return engine.backend if isinstance(engine, Engine) else None


def default_delay(engine: MouthEngine, alignment: Alignment) -> float:
    """Seconds from a sound's arrival to the frame that shows it leaving the server."""
    key = f"{engine.name}-gpu" if on_gpu(engine) else engine.name
    return least_delay(alignment) + RENDER_BUDGET[key]


def max_batch(engine: MouthEngine) -> int:
    if on_gpu(engine):
        return GPU_BATCH
    return INT8_BATCH if backend_name(engine) == "onnxruntime-int8" else CPU_BATCH


def check_delay(delay: float | None, alignment: Alignment) -> None:
    """ValueError, naming the flag, for a delay too short for the mel window and jitter."""
    if delay is not None and delay <= least_delay(alignment):
        raise ValueError(
            f"--delay must be more than {least_delay(alignment):.4f} s: Wav2Lip's mel window "
            f"({alignment} alignment) needs {lookahead_seconds(alignment)} s of audio beyond "
            f"each frame, plus {JITTER_SECONDS} s for jitter"
        )
