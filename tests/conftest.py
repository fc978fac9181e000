"""Shared fixtures: real face photos from ../shared/testdata and speech made with espeak-ng."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FACES = ROOT.parent / "shared" / "testdata" / "faces"


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not FACES.is_dir():
        pytest.skip(f"test photos not found at {FACES}")
    return FACES


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few seconds of real speech (22.05 kHz mono WAV) made with espeak-ng."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed; scripts/test.sh installs it")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = "Hello there. The quick brown fox jumps over the lazy dog."
    subprocess.run([espeak, "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="session")
def speech_16k(speech_wav: Path) -> np.ndarray:
    """The espeak speech as 16 kHz mono float32 samples."""
    from wav2lip.audio import load_audio

    return load_audio(speech_wav)


def random_wav2lip(seed: int = 0):
    """A Wav2Lip generator with random weights whose output really depends on its inputs.

    PyTorch's default initialisation leaves this deep network nearly constant, which would let
    a bug that ignores the audio pass. Here the convolutions get He initialisation, BatchNorm
    random statistics (so a folding bug shows), and the last layer is scaled so the logits
    before the sigmoid have mean 0 and standard deviation 2: outputs span [0, 1] unsaturated.
    """
    import torch
    from torch import nn

    from wav2lip.model import Wav2Lip

    generator = torch.Generator().manual_seed(seed)

    def normal(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + mean)

    model = Wav2Lip().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                normal(module.weight, (2 / module.weight[0].numel()) ** 0.5)
            elif isinstance(module, nn.ConvTranspose2d):
                fan = module.weight.shape[0] * module.weight.shape[2] * module.weight.shape[3]
                normal(module.weight, (2 / fan) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 0.1)
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
                normal(module.weight, 0.1, 1.0)
                normal(module.bias, 0.1)
        last = model.output_block[1]
        captured = []
        hook = last.register_forward_hook(lambda _m, _i, out: captured.append(out))
        model(torch.randn(8, 1, 80, 16, generator=generator), torch.rand(8, 6, 96, 96))
        hook.remove()
        logits = captured[0]
        scale = 2 / logits.std()
        last.weight.mul_(scale)
        last.bias.mul_(scale).sub_(logits.mean() * scale)
    return model


@pytest.fixture(scope="session")
def wav2lip_model():
    return random_wav2lip()


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory, wav2lip_model) -> Path:
    """Random weights saved as the official training checkpoint (DataParallel keys)."""
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "wav2lip_gan.pth"
    state = {f"module.{k}": v for k, v in wav2lip_model.state_dict().items()}
    torch.save({"state_dict": state, "optimizer": {}, "global_step": 1, "global_epoch": 1}, path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server in a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
