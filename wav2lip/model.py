"""The Wav2Lip generator, layer for layer as in the official repository.

Module names and order match the official `models/wav2lip.py`, so a `state_dict` saved by the
official training code loads here unchanged (352 entries, 36,298,035 trainable parameters).

The forward pass is split into its three parts because a still photo's face features never
change: the engine encodes the face once and runs only the audio encoder and decoder per frame.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv2d(nn.Module):
    """Convolution, BatchNorm, optional residual, ReLU: the official building block."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class Conv2dTranspose(nn.Module):
    """Transposed convolution, BatchNorm, ReLU: the decoder's upsampling block."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int,
        padding: int,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _res(channels: int, count: int) -> list[nn.Module]:
    """`count` residual 3x3 blocks that keep `channels`."""
    return [Conv2d(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


class Wav2Lip(nn.Module):
    """Generator: mel windows (B, 1, 80, 16) and faces (B, 6, 96, 96) to faces (B, 3, 96, 96)."""

    def __init__(self) -> None:
        super().__init__()
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(6, 16, 7, 1, 3)),  # 96
                nn.Sequential(Conv2d(16, 32, 3, 2, 1), *_res(32, 2)),  # 48
                nn.Sequential(Conv2d(32, 64, 3, 2, 1), *_res(64, 3)),  # 24
                nn.Sequential(Conv2d(64, 128, 3, 2, 1), *_res(128, 2)),  # 12
                nn.Sequential(Conv2d(128, 256, 3, 2, 1), *_res(256, 2)),  # 6
                nn.Sequential(Conv2d(256, 512, 3, 2, 1), *_res(512, 1)),  # 3
                nn.Sequential(Conv2d(512, 512, 3, 1, 0), Conv2d(512, 512, 1, 1, 0)),  # 1
            ]
        )
        self.audio_encoder = nn.Sequential(
            Conv2d(1, 32, 3, 1, 1),
            *_res(32, 2),
            Conv2d(32, 64, 3, (3, 1), 1),
            *_res(64, 2),
            Conv2d(64, 128, 3, 3, 1),
            *_res(128, 2),
            Conv2d(128, 256, 3, (3, 2), 1),
            *_res(256, 1),
            Conv2d(256, 512, 3, 1, 0),
            Conv2d(512, 512, 1, 1, 0),
        )
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(Conv2d(512, 512, 1, 1, 0)),  # 1
                nn.Sequential(Conv2dTranspose(1024, 512, 3, 1, 0), *_res(512, 1)),  # 3
                nn.Sequential(Conv2dTranspose(1024, 512, 3, 2, 1, 1), *_res(512, 2)),  # 6
                nn.Sequential(Conv2dTranspose(768, 384, 3, 2, 1, 1), *_res(384, 2)),  # 12
                nn.Sequential(Conv2dTranspose(512, 256, 3, 2, 1, 1), *_res(256, 2)),  # 24
                nn.Sequential(Conv2dTranspose(320, 128, 3, 2, 1, 1), *_res(128, 2)),  # 48
                nn.Sequential(Conv2dTranspose(160, 64, 3, 2, 1, 1), *_res(64, 2)),  # 96
            ]
        )
        self.output_block = nn.Sequential(
            Conv2d(80, 32, 3, 1, 1), nn.Conv2d(32, 3, 1, 1, 0), nn.Sigmoid()
        )

    def encode_face(self, faces: torch.Tensor) -> list[torch.Tensor]:
        """The skip features of each encoder stage, finest first."""
        feats = []
        x = faces
        for block in self.face_encoder_blocks:
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, mel: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """Audio embedding through the decoder, joined with the face features at each scale.

        `feats` may have batch size 1 while `mel` has B: a still photo's features are broadcast.
        """
        x = self.audio_encoder(mel)
        batch = x.shape[0]
        for block, skip in zip(self.face_decoder_blocks, reversed(feats)):
            x = block(x)
            x = torch.cat((x, skip.expand(batch, -1, -1, -1)), dim=1)
        return self.output_block(x)

    def forward(self, mel: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        return self.decode(mel, self.encode_face(faces))
