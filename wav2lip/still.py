"""The generator rebuilt for a still photo: per frame, only what the audio changes.

Four exact rewrites of the official decoder (BatchNorm already folded into the convolutions):

1. Photo terms. Each decoder stage convolves the concatenation of the previous stage's output
   and the face encoder's skip features. A convolution is linear, so it splits into a part on
   each; for a still photo the skip part (plus the bias) never changes, so it is computed once
   per photo and each frame adds it. The same holds for the output block's first convolution.
2. Lower rows. Only the lower face is shown (the feathered blend), and a convolution's output
   rows depend only on nearby input rows, so each decoder stage runs on the rows the next one
   needs and no others. A transposed convolution (k3, s2, p1) whose input starts at row s is
   exact from row 2s of its output. A 3x3 convolution whose input starts at such a cut is given
   no padding above it, so it returns only its exact rows: one fewer at the top, none computed
   to be thrown away. Working back from the first row shown (47 of 96) gives each stage's first
   row: the 12, 24, 48 and 96 pixel stages (most of the work) run on 10, 16, 28 and 52 of their
   rows, less one row per convolution after the cut.
3. Residuals in the weights. A residual block, relu(x + conv(x)), is one convolution whose
   centre tap has the identity added; ONNX Runtime then fuses each block into one kernel and
   keeps the features in its blocked layout from one block to the next. (Not for int8: a
   centre tap near 1 would take the whole range of its channel's quantized weights.)
4. Joins without transposed convolutions (for int8). ONNX Runtime has no int8 transposed
   convolution: it ran them in fp32, dequantizing their weights every frame, and they took
   most of an int8 frame's time. A transposed convolution is plain ones in disguise: from the
   1x1 embedding, a 1x1 convolution to each output pixel's channels; with stride 2, four
   convolutions, one per phase of the output (even or odd row, even or odd column),
   interleaved. (In fp32, ONNX Runtime's transposed kernel is faster, so there it stays.)

Only the rounding changes (the order of the additions, and the centre taps' added 1), so the
pixels match the plain forward to within the last bits of fp32 (the tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wav2lip.model import Conv2d, Conv2dTranspose, Wav2Lip

_SAME_3X3 = ((3, 3), (1, 1), (1, 1))  # kernel, stride, padding: the model's 3x3 convolutions


def _conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cut: bool
) -> torch.Tensor:
    """A 3x3 convolution with stride 1 and padding 1; at a cut (`x` starts below the stage's
    row 0), no padding above: the rows there are real but not computed, so the output starts
    one row lower, every row of it exact."""
    if cut:
        # With the value given, ONNX Runtime folds the Pad into the convolution (without, it
        # cannot tell the value is zero, and runs a Pad copy before each convolution).
        return F.conv2d(F.pad(x, (1, 1, 0, 1), value=0.0), weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


def _conv(block: nn.Module) -> nn.Conv2d | nn.ConvTranspose2d:
    """The convolution that a block of the model (`Conv2d`, `Conv2dTranspose`) starts with."""
    conv = block.conv_block[0] if isinstance(block, Conv2d | Conv2dTranspose) else None
    if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
        raise ValueError(f"expected a convolution block, got {type(block).__name__}")
    return conv


_EVEN, _ODD = [1], [2, 0]  # the taps of a stride-2 transposed 3x3 kernel, per output parity
# Each phase's kernel reaches one input row (column) further when the rows (columns) are odd:
# padded below (to the right) with the zero past the edge that the output padding stood for.
_PHASE_PADS = ((0, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 1), (0, 1, 0, 1))


def _phase_kernels(weight: torch.Tensor) -> list[torch.Tensor]:
    """A transposed 3x3 convolution with stride 2, padding 1 and output padding 1, as four
    plain kernels, one per output phase (row parity, then column parity). Output row 2m takes
    tap 1 of input row m; row 2m + 1, tap 2 of row m and tap 0 of row m + 1; so for columns.
    `weight` is (in, out, 3, 3); the kernels, (out, in, kh, kw), are 1x1, 1x2, 2x1 and 2x2."""
    conv = weight.transpose(0, 1)
    return [
        conv[:, :, rows][:, :, :, cols].contiguous()
        for rows in (_EVEN, _ODD)
        for cols in (_EVEN, _ODD)
    ]


def _phases(x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """The four phases' convolutions, interleaved into rows and columns twice as many."""
    outs = [
        F.conv2d(F.pad(x, pad, value=0.0) if any(pad) else x, kernel)
        for kernel, pad in zip(kernels, _PHASE_PADS)
    ]
    batch, channels, height, width = outs[0].shape
    # Channel c * 4 + phase, which pixel_shuffle places at (2 * row + row parity, ...).
    stacked = torch.stack(outs, 2).reshape(batch, channels * 4, height, width)
    return F.pixel_shuffle(stacked, 2)


class _Join(nn.Module):
    """A stage's first layer, on the concatenation of the running features and the skip
    features, split in two: the running part runs per frame, the skip part once per photo."""

    running_weight: torch.Tensor
    skip_weight: torch.Tensor
    bias: torch.Tensor | None
    embedding: torch.Tensor  # with the "embedding" rewrite

    def __init__(
        self,
        layer: nn.Conv2d | nn.ConvTranspose2d,
        skip_channels: int,
        cut: bool,
        plain: bool = False,
    ) -> None:
        """`plain`: the running part's transposed convolution as plain ones (rewrite 4)."""
        super().__init__()
        self.transposed = isinstance(layer, nn.ConvTranspose2d)
        # A transposed convolution is exact at a cut as it is; a 3x3 one loses a row there.
        self.cut = cut and not self.transposed
        shape = (layer.kernel_size, layer.stride, layer.padding)
        if not self.transposed and shape != _SAME_3X3:
            raise ValueError("expected a 3x3 convolution with stride 1 and padding 1")
        # Only a Conv2d can have "same" or "valid" padding, and the check above turned it away.
        assert not isinstance(layer.padding, str)
        self.stride, self.padding = layer.stride, layer.padding
        self.output_padding = getattr(layer, "output_padding", (0, 0))
        # Conv2d weights are (out, in, kh, kw); ConvTranspose2d weights are (in, out, kh, kw).
        weight = layer.weight.detach()
        running = (weight.shape[0] if self.transposed else weight.shape[1]) - skip_channels
        parts = weight.split(running, 0 if self.transposed else 1)
        self.register_buffer("running_weight", parts[0].contiguous())
        self.register_buffer("skip_weight", parts[1].contiguous())
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.rewrite = ""  # how the running part runs: as it is, "embedding" or "phases"
        if plain and self.transposed:
            self._rewrite(shape)

    def _rewrite(self, shape: tuple[object, ...]) -> None:
        weight = self.running_weight  # (in, out, 3, 3)
        if shape == ((3, 3), (1, 1), (0, 0)):
            # From a 1x1 input, output pixel (y, x) of channel c is a 1x1 convolution's
            # channel c * 9 + y * 3 + x.
            kernel = weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0], 1, 1)
            self.register_buffer("embedding", kernel.contiguous())
            self.rewrite = "embedding"
        elif shape == ((3, 3), (2, 2), (1, 1)) and self.output_padding == (1, 1):
            for index, kernel in enumerate(_phase_kernels(weight)):
                self.register_buffer(f"phase{index}", kernel)
            self.rewrite = "phases"
        else:
            raise ValueError(f"no plain form for a transposed convolution {shape}")

    def _running(self, x: torch.Tensor) -> torch.Tensor:
        if self.rewrite == "embedding":
            # Only the 1x1 embedding stage is built this way (`StillGenerator`).
            channels = self.running_weight.shape[1]
            return F.conv2d(x, self.embedding).reshape(x.shape[0], channels, 3, 3)
        if self.rewrite == "phases":
            return _phases(x, [getattr(self, f"phase{index}") for index in range(4)])
        return self._layer(x, self.running_weight, None, self.cut)

    def _layer(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cut: bool
    ) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose2d(
                x, weight, bias, self.stride, self.padding, self.output_padding
            )
        return _conv3x3(x, weight, bias, cut)

    def skip_term(self, skip: torch.Tensor) -> torch.Tensor:
        """The skip features' part plus the bias, on all rows: constant for a photo."""
        return self._layer(skip, self.skip_weight, self.bias, cut=False)

    def forward(self, x: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return self._running(x) + term


class _Residual(nn.Module):
    """A residual 3x3 block, relu(x + conv(x)). With `fold`, relu(conv'(x)): the identity is
    added to the centre tap of conv's weights. At a cut, one row fewer (see `_conv3x3`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, block: Conv2d, cut: bool, fold: bool) -> None:
        super().__init__()
        conv, norm = block.conv_block
        if not (
            block.residual
            and isinstance(conv, nn.Conv2d)
            and (conv.kernel_size, conv.stride, conv.padding) == _SAME_3X3
        ):
            raise ValueError("expected a residual 3x3 block with stride 1 and padding 1")
        if not isinstance(norm, nn.Identity):
            raise ValueError("fold the BatchNorm into the convolution first")
        weight = conv.weight.detach()
        if fold:
            weight = weight.clone()
            channels = torch.arange(weight.shape[0], device=weight.device)
            weight[channels, channels, 1, 1] += 1.0
        self.register_buffer("weight", weight)
        bias = conv.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cut, self.fold = cut, fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _conv3x3(x, self.weight, self.bias, self.cut)
        if not self.fold:
            out = out + (x[:, :, 1:] if self.cut else x)
        return torch.relu(out)


class StillGenerator(nn.Module):
    """Mel windows to the lower rows of the generated face, given a photo's terms.

    `model` must have its BatchNorm folded (`engine.fold_batchnorm`); this module runs its
    layers, with each join's weights split in two and, with `fold_residuals`, the residuals
    folded in (build it in fp32, then cast it: the folded centre taps are rounded once) and,
    with `plain_joins`, the joins' transposed convolutions run as plain ones.
    `first_row`: the first row of the 96x96 face that is shown; rows from `first_exact_row`
    (at most `first_row`) are returned; 0 computes them all.
    """

    def __init__(
        self,
        model: Wav2Lip,
        first_row: int = 0,
        fold_residuals: bool = True,
        plain_joins: bool = False,
    ) -> None:
        super().__init__()
        self.face_encoder = model.face_encoder_blocks  # its encoders run as they are
        self.audio_encoder = model.audio_encoder
        self.fold_residuals = fold_residuals
        self.first_block = model.face_decoder_blocks[0]  # the embedding's 1x1 conv, no skip
        # Stages 1-6 are the other decoder blocks, stage 7 the output block. Stage k joins the
        # skip features of encoder block 7 - k; its first layer is the join, the rest follow.
        stages = []
        for block in [*model.face_decoder_blocks[1:], model.output_block]:
            join, *rest = block.children()
            stages.append((join, rest))
        # The rows a stage's 3x3 convolutions lose at a cut, one each: the output block's
        # join, and the residual blocks after a transposed join (it loses none).
        layers = [_conv(join) for join, _ in stages]
        join_losses = [0 if isinstance(layer, nn.ConvTranspose2d) else 1 for layer in layers]
        rest_losses = [sum(isinstance(block, Conv2d) for block in rest) for _, rest in stages]
        # From the last stage back: the first input row each stage needs so that its output is
        # exact from the row the next one needs. A transposed convolution with stride 2
        # doubles rows; the first stage's (3x3 from 1x1) is never cut.
        needs = [0] * len(stages)
        need = first_row
        for i in range(len(stages) - 1, 0, -1):
            loss = join_losses[i] + rest_losses[i]
            need = needs[i] = max(0, (need - loss) // layers[i].stride[0])
        # Then forwards: rows dropped before each stage, and where its join's output starts.
        self.joins = nn.ModuleList()
        self.rests = nn.ModuleList()
        self.drops: list[int] = []
        self.starts: list[int] = []
        offset = 0  # the first row of the running features, in their own rows
        for stage, (layer, (_, rest), join_loss, rest_loss, need) in enumerate(
            zip(layers, stages, join_losses, rest_losses, needs), 1
        ):
            cut = need > 0
            *_, last = model.face_encoder_blocks[7 - stage].children()
            skip = _conv(last).out_channels
            self.joins.append(_Join(layer, skip, cut, plain_joins))
            self.rests.append(
                nn.Sequential(
                    *(
                        _Residual(b, cut, fold_residuals) if isinstance(b, Conv2d) else b
                        for b in rest
                    )
                )
            )
            self.drops.append(need - offset)
            start = need * layer.stride[0] + (join_loss if cut else 0)
            self.starts.append(start)
            offset = start + (rest_loss if cut else 0)
        self.first_exact_row = offset

    def photo_terms(self, faces: torch.Tensor) -> list[torch.Tensor]:
        """A photo's constant terms, one per stage, from its (B, 6, 96, 96) model input."""
        feats = []  # the skip features of each encoder block, finest first
        for block in self.face_encoder:
            faces = block(faces)
            feats.append(faces)
        terms = []
        for index, (join, start) in enumerate(zip(self.joins, self.starts)):
            assert isinstance(join, _Join)  # a ModuleList types its items only as nn.Module
            terms.append(join.skip_term(feats[6 - index])[:, :, start:])
        return terms

    def forward(self, mel: torch.Tensor, *terms: torch.Tensor) -> torch.Tensor:
        """(B, 1, 80, 16) mel windows and a photo's terms (batch 1 or B) to (B, 3, R, 96)
        faces in [0, 1], R = 96 - `first_exact_row`."""
        x = self.first_block(self.audio_encoder(mel))
        for join, rest, term, drop in zip(self.joins, self.rests, terms, self.drops):
            if drop:  # no empty slices: each costs a copy in ONNX Runtime
                x = x[:, :, drop:]
            x = rest(torch.relu(join(x, term)))
        return x
