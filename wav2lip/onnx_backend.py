"""The engine's decoder on ONNX Runtime, for the CPU.

Same graph, same fp32 arithmetic (within a thousandth of a pixel level of PyTorch), but ONNX
Runtime's CPU kernels run this network's small convolutions much faster than PyTorch's eager
ones at the small batches real time allows (measured in docs/benchmarks.md). The decoder is
exported once when the engine is made, with the per-photo terms as inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from wav2lip.audio import MAX_ABS
from wav2lip.still import StillGenerator
from wav2lip.threads import in_named_thread


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxDecoder:
    """Runs a `StillGenerator` on mel windows (B, 1, 80, 16) and a photo's terms (1 or B each)
    on ONNX Runtime.

    `int8` quantizes the decoder (static, per channel, calibrated on synthetic faces and mel
    windows): faster, but not exact; the benchmark reports by how much it differs.
    """

    def __init__(self, generator: StillGenerator, threads: int, int8: bool = False) -> None:
        import onnxruntime

        if int8 and generator.fold_residuals:
            raise ValueError("int8 needs a generator without folded residuals")
        with torch.inference_mode():
            terms = generator.photo_terms(torch.zeros(1, 6, 96, 96))
        names = ["mel"] + [f"term{i}" for i in range(len(terms))]
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated
            warnings.simplefilter("ignore")
            torch.onnx.export(
                generator,
                (torch.zeros(2, 1, 80, 16), *terms),
                # The stub says a path, but the TorchScript exporter writes to a file object.
                buffer,  # type: ignore[arg-type]
                input_names=names,
                output_names=["face"],
                # Terms have batch 1 (one photo, broadcast) or the mel windows' batch.
                dynamic_axes={
                    name: {0: "photos" if name.startswith("term") else "batch"}
                    for name in [*names, "face"]
                },
                opset_version=17,
                dynamo=False,
            )
        graph = buffer.getvalue()
        if int8:
            graph = _quantize(graph, generator)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Worker threads that spin between frames (40 ms apart) take a core from the encoder and
        # the event loop: measured in one session, 156% CPU instead of 173%, more frames inferred.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Its worker threads are named for what they do, in `top -H` and the benchmark.
        self._session = in_named_thread(
            "inference",
            lambda: onnxruntime.InferenceSession(
                graph, options, providers=["CPUExecutionProvider"]
            ),
        )

    def __call__(self, mel: np.ndarray, terms: list[np.ndarray]) -> np.ndarray:
        inputs = {"mel": mel, **{f"term{i}": t for i, t in enumerate(terms)}}
        return self._session.run(None, inputs)[0]


CALIBRATION_SAMPLES = 32


def _calibration(still: StillGenerator) -> list[dict[str, np.ndarray]]:
    """Inputs spanning what the decoder sees: smooth random faces and mel windows over the
    mel scale's whole range, silence (-MAX_ABS) to the loudest (+MAX_ABS). (Calibrated up to
    +2 only, loud windows were clipped: 6.4 levels off on average with random weights, 4.3
    over the whole range, 4.5 since the transposed convolutions are quantized too;
    tests/test_engine.py.)"""
    generator = torch.Generator().manual_seed(0)
    samples = []
    with torch.inference_mode():
        for _ in range(CALIBRATION_SAMPLES):
            coarse = torch.rand(1, 6, 12, 12, generator=generator)
            face = torch.nn.functional.interpolate(coarse, size=96, mode="bilinear")
            terms = still.photo_terms(face)
            mel = (torch.rand(1, 1, 80, 16, generator=generator) * 2 - 1) * MAX_ABS
            samples.append(
                {"mel": mel.numpy(), **{f"term{i}": t.numpy() for i, t in enumerate(terms)}}
            )
    return samples


def _quantize(graph: bytes, generator: StillGenerator) -> bytes:
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(_calibration(generator))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._samples, None)

    with tempfile.TemporaryDirectory() as folder:
        exported, source = Path(folder) / "exported.onnx", Path(folder) / "fp32.onnx"
        target = Path(folder) / "int8.onnx"
        exported.write_bytes(graph)
        # Constants folded first, the zero padding of the cut convolutions into the
        # convolutions among them: otherwise each Pad runs on dequantized fp32 features.
        quant_pre_process(str(exported), str(source), skip_symbolic_shape=True)
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        return target.read_bytes()
