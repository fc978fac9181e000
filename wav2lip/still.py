"""The generator rebuilt for a still photo: per frame, only what the audio changes.

Two exact rewrites of the official decoder (BatchNorm already folded into the convolutions):

1. Photo terms. Each decoder stage convolves the concatenation of the previous stage's output
   and the face encoder's skip features. A convolution is linear, so it splits into a part on
   each; for a still photo the skip part (plus the bias) never changes, so it is computed once
   per photo and each frame adds it. The same holds for the output block's first convolution.
2. Lower rows. Only the lower face is shown (the feathered blend), and a convolution's output
   rows depend only on nearby input rows, so each decoder stage runs on the rows the next one
   needs and no others. A transposed convolution (k3, s2, p1) whose input starts at row s is
   exact from row 2s of its output; each 3x3 convolution after it spoils one row at the cut,
   which is dropped. Working back from the first row shown (47 of 96) gives each stage's
   first row: the 12, 24, 48 and 96 pixel stages (most of the work) run on 10, 16, 28 and 52
   of their rows, which end exactly as the plain forward computes them.

Only the order of the additions changes, so the pixels match the plain forward to within the
rounding of the last bit (the tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wav2lip.model import Wav2Lip


class _Join(nn.Module):
    """A stage's first layer, on the concatenation of the running features and the skip
    features, split in two: the running part runs per frame, the skip part once per photo."""

    def __init__(self, layer: nn.Conv2d | nn.ConvTranspose2d, skip_channels: int) -> None:
        super().__init__()
        self.transposed = isinstance(layer, nn.ConvTranspose2d)
        self.stride, self.padding = layer.stride, layer.padding
        self.output_padding = getattr(layer, "output_padding", (0, 0))
        # Conv2d weights are (out, in, kh, kw); ConvTranspose2d weights are (in, out, kh, kw).
        weight = layer.weight.detach()
        running = (weight.shape[0] if self.transposed else weight.shape[1]) - skip_channels
        parts = weight.split(running, 0 if self.transposed else 1)
        self.register_buffer("running_weight", parts[0].contiguous())
        self.register_buffer("skip_weight", parts[1].contiguous())
        self.register_buffer("bias", layer.bias.detach().clone())

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        if self.transposed:
            return F.conv_transpose2d(
                x, weight, bias, self.stride, self.padding, self.output_padding
            )
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def skip_term(self, skip: torch.Tensor) -> torch.Tensor:
        """The skip features' part plus the bias: constant for a photo."""
        return self._layer(skip, self.skip_weight, self.bias)

    def forward(self, x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return self._layer(x, self.running_weight, None) + term


class StillGenerator(nn.Module):
    """Mel windows to the lower rows of the generated face, given a photo's terms.

    `model` must have its BatchNorm folded (`engine.fold_batchnorm`); this module runs its
    layers, with each join's weights split in two. `first_row`: the first row of the 96x96
    face that is shown; rows from `first_exact_row` (at most `first_row`) are returned; 0
    computes them all.
    """

    def __init__(self, model: Wav2Lip, first_row: int = 0) -> None:
        super().__init__()
        self.wav2lip = model  # its encoders run as they are
        self.first_block = model.face_decoder_blocks[0]  # the embedding's 1x1 conv, no skip
        # Stages 1-6 are the other decoder blocks, stage 7 the output block. Stage k joins the
        # skip features of encoder block 7 - k; its first layer is the join, the rest follow.
        stages = [(block[0], block[1:]) for block in model.face_decoder_blocks[1:]]
        stages.append((model.output_block[0], model.output_block[1:]))
        self.joins = nn.ModuleList()
        self.rests = nn.ModuleList()
        for stage, (join, rest) in enumerate(stages, 1):
            skip = model.face_encoder_blocks[7 - stage][-1].conv_block[0].out_channels
            self.joins.append(_Join(join.conv_block[0], skip))
            self.rests.append(nn.Sequential(*rest))
        # Every 3x3 convolution at stride 1 spoils a row at a cut: each decoder stage's
        # residual layers, and the output block's join (its rest is a 1x1 convolution).
        spoils = [len(rest) for _, rest in stages[:-1]] + [1]
        # From the last stage back: the first input row each stage needs so that what it
        # returns is exact from the row the next one needs. A transposed convolution with
        # stride 2 doubles rows; the first stage's (3x3 from 1x1) is never cut.
        needs = []
        need = first_row
        for join, spoil in zip(reversed(self.joins[1:]), reversed(spoils[1:])):
            need = max(0, (need - spoil) // join.stride[0])
            needs.append(need)
        needs = [0, *reversed(needs)]
        # Then forwards: rows dropped before each stage, where its join's output starts, and
        # rows dropped after it (spoiled at the cut).
        self.drops: list[int] = []
        self.starts: list[int] = []
        self.trims: list[int] = []
        offset = 0  # the first row of the running features, in their own rows
        for join, spoil, need in zip(self.joins, spoils, needs):
            self.drops.append(need - offset)
            start = need * join.stride[0]
            trim = spoil if start else 0
            self.starts.append(start)
            self.trims.append(trim)
            offset = start + trim
        self.first_exact_row = offset

    def photo_terms(self, faces: torch.Tensor) -> list[torch.Tensor]:
        """A photo's constant terms, one per stage, from its (B, 6, 96, 96) model input."""
        feats = self.wav2lip.encode_face(faces)
        return [
            join.skip_term(feats[6 - index])[:, :, start:]
            for index, (join, start) in enumerate(zip(self.joins, self.starts))
        ]

    def forward(self, mel: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 16) mel windows and a photo's terms (batch 1 or B) to (B, 3, R, 96)
        faces in [0, 1], R = 96 - `first_exact_row`."""
        x = self.first_block(self.wav2lip.audio_encoder(mel))
        for join, rest, term, drop, trim in zip(
            self.joins, self.rests, terms, self.drops, self.trims
        ):
            if drop:  # no empty slices: each costs a copy in ONNX Runtime
                x = x[:, :, drop:]
            x = rest(torch.relu(join(x, term)))
            if trim:
                x = x[:, :, trim:]
        return x
