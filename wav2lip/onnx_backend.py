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
    """Decodes mel windows (B, 1, 80, 16) with face features (1 or B each) on ONNX Runtime."""

    def __init__(self, model: Wav2Lip, cut: int, threads: int) -> None:
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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            buffer.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, mel: np.ndarray, feats: list[np.ndarray]) -> np.ndarray:
        inputs = {"mel": mel, **{f"face{i}": f for i, f in enumerate(feats)}}
        return self._session.run(None, inputs)[0]
