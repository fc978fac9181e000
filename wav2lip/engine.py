"""Batched Wav2Lip inference for still photos.

A photo is prepared once: what the face encoder contributes to the decoder never changes for a
still photo, so it is computed then (`still.StillGenerator`). Each frame then costs only the
audio encoder and the decoder, on the rows the picture shows. BatchNorm is folded into the
convolutions before any of this, which changes nothing but the arithmetic's rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from wav2lip import onnx_backend
from wav2lip.cuda_graphs import GraphedDecoder
from wav2lip.faces import face_crop
from wav2lip.model import Wav2Lip
from wav2lip.still import StillGenerator


def pick_device(device: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _fold(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it, in place."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("only a BatchNorm that tracks running statistics can be folded")
    scale = bn.weight / torch.sqrt(var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
    # Conv2d weights are (out, in, kh, kw); ConvTranspose2d weights are (in, out, kh, kw).
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(shape))
        conv.bias = nn.Parameter((bias - mean) * scale + bn.bias)


def fold_batchnorm(model: Wav2Lip) -> Wav2Lip:
    """A copy of `model` with every conv+BatchNorm pair folded into one convolution."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        block = getattr(module, "conv_block", None)
        if (
            isinstance(block, nn.Sequential)
            and isinstance(block[0], nn.Conv2d | nn.ConvTranspose2d)
            and isinstance(block[1], nn.BatchNorm2d)
        ):
            _fold(block[0], block[1])
            block[1] = nn.Identity()
    return folded


class MouthEngine(Protocol):
    """What renders mouths: prepare a photo's model input once, then infer mel windows.

    `Engine` (Wav2Lip) and the weight-free `Animator` both satisfy it, so the renderer and the
    server never care which one they drive.
    """

    name: str

    def prepare(self, face_input: np.ndarray) -> Any:
        """Per-photo state from the (6, 96, 96) model input in [0, 1]."""

    def infer(self, face: Any | Sequence[Any], mels: np.ndarray) -> np.ndarray:
        """Mel windows (B, 80, 16) to mouth crops (B, 96, 96, 3) uint8 BGR.

        `face` is one photo's state for the whole batch, or a sequence of B states: the
        scheduler batches frames of several sessions together.
        """


BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")


@dataclass
class PreparedFace:
    """What the engine keeps per photo: its terms for the decoder, computed once, and the crop
    that stands in for rows the engine does not compute."""

    terms: list[torch.Tensor]
    crop: np.ndarray


class Engine:
    """Renders 96x96 mouth crops from mel windows for prepared photos."""

    name = "wav2lip"

    def __init__(
        self,
        model: Wav2Lip,
        device: str = "auto",
        half: bool | None = None,
        first_row: int = 0,
        backend: str = "auto",
        cuda_graphs: bool | None = None,
    ) -> None:
        """`first_row`: the first row of the 96x96 output that is shown (the feathered blend
        shows only the lower face); rows above it are copied from the photo, not computed.
        0 computes everything, as the official inference does.

        `backend`: "torch", or "onnxruntime" (CPU only, same fp32 arithmetic, faster); "auto"
        takes ONNX Runtime on the CPU when it is installed. "onnxruntime-int8" quantizes the
        decoder: faster still, not exact (an option, never the default).

        `cuda_graphs`: replay the decoder as CUDA graphs (default: on CUDA).
        """
        # ONNX Runtime runs on the CPU: asking for it picks the CPU when the device is "auto".
        onnx = backend.startswith("onnxruntime")
        self.device = pick_device("cpu" if onnx and device == "auto" else device)
        self.half = self.device.type == "cuda" if half is None else half
        self.dtype = torch.float16 if self.half else torch.float32
        if backend == "auto":
            on_cpu = self.device.type == "cpu" and not self.half
            backend = "onnxruntime" if on_cpu and onnx_backend.available() else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or auto, not {backend!r}")
        onnx = backend.startswith("onnxruntime")
        if onnx and (self.device.type != "cpu" or self.half):
            raise ValueError("the onnxruntime backends run on the CPU in fp32 only")
        self.backend = backend
        int8 = backend.endswith("int8")
        # Built in fp32, then cast: its folded weights are rounded once.
        folded = fold_batchnorm(model).float()
        # For int8, no folded residuals and no transposed convolutions (`still`, 3 and 4).
        generator = StillGenerator(folded, first_row, fold_residuals=not int8, plain_joins=int8)
        self.generator = generator.to(self.device, self.dtype).eval()
        self.first_exact_row = self.generator.first_exact_row
        self._onnx = (
            onnx_backend.OnnxDecoder(self.generator, torch.get_num_threads(), int8=int8)
            if onnx
            else None
        )
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and backend == "torch"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._graphs = GraphedDecoder(self._decode, (1, 80, 16)) if cuda_graphs else None
        self.cuda_graphs = cuda_graphs

    def _decode(self, mel: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        return self.generator(mel, *terms)

    @torch.inference_mode()
    def prepare(self, face_input: np.ndarray) -> PreparedFace:
        """Encode the model input of a photo, (6, 96, 96) float in [0, 1], once."""
        faces = torch.tensor(face_input[None]).to(self.device, self.dtype)  # may be read-only
        return PreparedFace(self.generator.photo_terms(faces), face_crop(face_input))

    @torch.inference_mode()
    def infer(self, face: PreparedFace | Sequence[PreparedFace], mels: np.ndarray) -> np.ndarray:
        """Mel windows (B, 80, 16) to mouth crops (B, 96, 96, 3) uint8 BGR, for one photo or
        one photo per window. Pixels are truncated to uint8 as the official inference does."""
        photos = [face] if isinstance(face, PreparedFace) else list(face)
        if all(photo is photos[0] for photo in photos):
            terms = photos[0].terms  # broadcast over the batch
        else:
            terms = [torch.cat(stage) for stage in zip(*(p.terms for p in photos))]
        mel = torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32)[:, None])
        if self._onnx is not None:
            out = torch.from_numpy(self._onnx(mel.numpy(), [t.numpy() for t in terms]))
        else:
            decode = self._graphs or self._decode
            out = decode(mel.to(self.device, self.dtype), terms)
        # Truncated to uint8 where it was computed: a quarter of the bytes to copy back.
        pixels = out.float().mul_(255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if not self.first_exact_row:
            return pixels
        top = self.first_exact_row
        mouths = np.empty((len(mels), *photos[0].crop.shape), np.uint8)
        mouths[:, :top] = np.stack([photo.crop[:top] for photo in photos])
        mouths[:, top:] = pixels
        return mouths
