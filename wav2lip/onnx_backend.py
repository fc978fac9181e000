"""The engine's decoder on ONNX Runtime, for the CPU.

Same graph, same fp32 arithmetic (within a thousandth of a pixel level of PyTorch), but ONNX
Runtime's CPU kernels run this network's small convolutions much faster than PyTorch's eager
ones at the small batches real time allows (measured in docs/benchmarks.md). The decoder is
exported once when the engine is made, with the per-photo face features as inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from wav2lip.model import Wav2Lip

FEATURES = 7  # the face encoder's stages, each an input of the decoder


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Decoder(nn.Module):
    """`decode` (or `decode_lower`) with the face features as separate inputs, for export."""

    def __init__(self, model: Wav2Lip, cut: int) -> None:
        super().__init__()
        self.model = model
        self.cut = cut

    def forward(self, mel: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        from wav2lip.engine import decode_lower  # the engine imports this module

        if self.cut:
            return decode_lower(self.model, mel, list(feats), self.cut)
        return self.model.decode(mel, list(feats))


class OnnxDecoder:
    """Decodes mel windows (B, 1, 80, 16) with face features (1 or B each) on ONNX Runtime.

    `int8` quantizes the decoder (static, per channel, calibrated on synthetic faces and mel
    windows): faster, but not exact; the benchmark reports by how much it differs.
    """

    def __init__(self, model: Wav2Lip, cut: int, threads: int, int8: bool = False) -> None:
        import onnxruntime

        names = ["mel"] + [f"face{i}" for i in range(FEATURES)]
        with torch.inference_mode():
            feats = model.encode_face(torch.zeros(1, 6, 96, 96))
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Decoder(model, cut).eval(),
                (torch.zeros(2, 1, 80, 16), *feats),
                buffer,
                input_names=names,
                output_names=["face"],
                dynamic_axes={name: {0: "batch"} for name in [*names, "face"]},
                opset_version=17,
                dynamo=False,
            )
        graph = buffer.getvalue()
        if int8:
            graph = _quantize(graph, model)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Worker threads that spin between frames (40 ms apart) take a core from the encoder and
        # the event loop: measured in one session, 156% CPU instead of 173%, more frames inferred.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, mel: np.ndarray, feats: list[np.ndarray]) -> np.ndarray:
        inputs = {"mel": mel, **{f"face{i}": f for i, f in enumerate(feats)}}
        return self._session.run(None, inputs)[0]


CALIBRATION_SAMPLES = 32


def _calibration(model: Wav2Lip) -> list[dict[str, np.ndarray]]:
    """Inputs spanning what the decoder sees: smooth random faces and mel windows from
    silence (-4) to loud speech."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    with torch.inference_mode():
        for _ in range(CALIBRATION_SAMPLES):
            coarse = torch.rand(1, 6, 12, 12, generator=generator)
            face = torch.nn.functional.interpolate(coarse, size=96, mode="bilinear")
            feats = model.encode_face(face)
            mel = torch.rand(1, 1, 80, 16, generator=generator) * 6 - 4
            samples.append(
                {"mel": mel.numpy(), **{f"face{i}": f.numpy() for i, f in enumerate(feats)}}
            )
    return samples


def _quantize(graph: bytes, model: Wav2Lip) -> bytes:
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._samples = iter(_calibration(model))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._samples, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(graph)
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
