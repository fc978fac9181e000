"""Wav2Lip as pure computation: the generator, its checkpoints, the mel front end, faces,
blending, the batched engine and the offline renderer. No networking lives here."""

from wav2lip.audio import MelStream, load_audio, mel_window, mel_windows, melspectrogram
from wav2lip.checkpoint import CheckpointError, load_checkpoint
from wav2lip.model import Wav2Lip

__all__ = [
    "CheckpointError",
    "MelStream",
    "Wav2Lip",
    "load_audio",
    "load_checkpoint",
    "mel_window",
    "mel_windows",
    "melspectrogram",
]
