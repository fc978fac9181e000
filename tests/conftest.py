"""Shared fixtures: real face photos from ../shared/testdata and speech made with espeak-ng."""

from __future__ import annotations

import shutil
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
