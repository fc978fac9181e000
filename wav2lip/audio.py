"""The audio front end: 16 kHz samples to the mel spectrogram Wav2Lip was trained on.

This reproduces the official ``audio.py`` (with its ``hparams``) exactly: pre-emphasis 0.97, a
centred STFT (n_fft 800, hop 200, Hann window 800) with *reflect* padding as in the librosa 0.7
used for training, magnitude, 80 Slaney mel bands from 55 to 7600 Hz, ``20*log10(max(1e-5, x))
- 20`` dB, and symmetric normalisation to [-4, 4].

`MelStream` computes the same frames incrementally for live audio, and `mel_window` maps video
frames to mel windows with the official rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import av
import librosa
import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 800
HOP = 200
N_MELS = 80
FPS = 25
MEL_STEP = 16  # mel frames per model input window (0.2 s)
MEL_PER_VIDEO_FRAME = 80 / FPS  # 80 mel frames per second of audio
SAMPLES_PER_VIDEO_FRAME = SAMPLE_RATE // FPS  # 640
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS = 4.0

# A mel frame t is centred on sample t*HOP and spans N_FFT samples: it is final once
# t*HOP + N_FFT//2 samples have arrived.
# A video frame i reads mel frames int(3.2 i) .. int(3.2 i) + 15, so it needs audio up to
# (int(3.2 i) + 15) * HOP + N_FFT // 2 samples; that is at most this far beyond the frame's start
# (i * 640 samples), reached whenever 3.2 i is a whole number:
LOOKAHEAD_SAMPLES = (MEL_STEP - 1) * HOP + N_FFT // 2  # 3400 samples
LOOKAHEAD_SECONDS = LOOKAHEAD_SAMPLES / SAMPLE_RATE  # 0.2125 s


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=55, fmax=7600
    ).astype(np.float32)


def prepare() -> None:
    """Build the mel filters now: the first call imports librosa's filters (and SciPy), which
    takes seconds, and a server must not spend them inside its first session's frame loop."""
    _mel_basis()


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    # librosa's get_window("hann", 800, fftbins=True): the periodic Hann window.
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float64)


def _frames_to_mel(frames: np.ndarray) -> np.ndarray:
    """Windowed frames (T, N_FFT) of pre-emphasised audio to normalised mel (80, T)."""
    magnitude = np.abs(np.fft.rfft(frames * _window(), axis=1)).T  # (401, T)
    mel = _mel_basis() @ magnitude.astype(np.float32)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    normed = (2 * MAX_ABS) * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS
    return np.clip(normed, -MAX_ABS, MAX_ABS).astype(np.float32)


def _preemphasis(wav: np.ndarray, previous: float = 0.0) -> np.ndarray:
    """y[n] = x[n] - 0.97 x[n-1] (scipy's lfilter([1, -0.97], [1]) when previous is 0)."""
    shifted = np.concatenate(([previous], wav[:-1]))
    return wav - PREEMPHASIS * shifted


def _frame_view(padded: np.ndarray, count: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[: count * HOP : HOP]


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """16 kHz mono float samples to the official (80, T) mel spectrogram, T = 1 + len // 200."""
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise ValueError(f"expected mono samples (1-D), got shape {wav.shape}")
    if len(wav) <= N_FFT // 2:
        raise ValueError(f"need more than {N_FFT // 2} samples, got {len(wav)}")
    emphasised = _preemphasis(wav)
    padded = np.pad(emphasised, N_FFT // 2, mode="reflect")
    count = 1 + len(wav) // HOP
    return _frames_to_mel(_frame_view(padded, count))


class MelStream:
    """Incremental `melspectrogram`: feed chunks of any size, get each mel frame once final.

    Frame t is emitted as soon as t*200 + 400 samples have arrived (401 for frame 0); it
    equals the offline result for every frame whose window lies inside the audio (the offline
    form reflects the audio's end, which a stream cannot know).
    """

    def __init__(self) -> None:
        self._buffer = np.zeros(0, dtype=np.float64)  # pre-emphasised samples
        self._padded = False  # whether the start's reflection has been prepended
        self._base = 0  # index in the padded signal of _buffer[0], once padded
        self._last_sample = 0.0
        self.frames_out = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add samples; return the newly final mel frames as (80, n), n possibly 0."""
        samples = np.asarray(samples, dtype=np.float64).ravel()
        if samples.size:
            self._buffer = np.concatenate((self._buffer, _preemphasis(samples, self._last_sample)))
            self._last_sample = float(samples[-1])
        if not self._padded:
            # The start's reflection needs samples 1..400; until then nothing is final.
            if self._buffer.size <= N_FFT // 2:
                return np.zeros((N_MELS, 0), dtype=np.float32)
            self._buffer = np.concatenate((self._buffer[N_FFT // 2 : 0 : -1], self._buffer))
            self._padded = True
        start = self.frames_out * HOP - self._base
        count = (self._buffer.size - start - N_FFT) // HOP + 1
        if count <= 0:
            return np.zeros((N_MELS, 0), dtype=np.float32)
        mel = _frames_to_mel(_frame_view(self._buffer[start:], count))
        self.frames_out += count
        consumed = self.frames_out * HOP - self._base
        self._buffer = self._buffer[consumed:]
        self._base += consumed
        return mel


def window_start(frame: int) -> int:
    """The first mel frame of video frame `frame`'s window (the official rule)."""
    return int(frame * MEL_PER_VIDEO_FRAME)


def samples_needed(frame: int) -> int:
    """Samples of audio video frame `frame` needs before its whole mel window is final."""
    return (window_start(frame) + MEL_STEP - 1) * HOP + N_FFT // 2


def mel_window(mel: np.ndarray, frame: int) -> np.ndarray:
    """The official inference's mel window for video frame `frame`: (80, 16)."""
    start = window_start(frame)
    if start + MEL_STEP > mel.shape[1]:
        return mel[:, mel.shape[1] - MEL_STEP :]
    return mel[:, start : start + MEL_STEP]


def mel_windows(mel: np.ndarray) -> Iterator[np.ndarray]:
    """Every video frame's window, as official inference: until one would pass the end, which
    is replaced by the last 16 mel frames."""
    if mel.shape[1] < MEL_STEP:
        raise ValueError(
            f"audio too short: need at least {MEL_STEP} mel frames "
            f"({(MEL_STEP - 1) * HOP / SAMPLE_RATE:.2f} s), got {mel.shape[1]}"
        )
    frame = 0
    while window_start(frame) + MEL_STEP <= mel.shape[1]:
        yield mel_window(mel, frame)
        frame += 1
    yield mel[:, mel.shape[1] - MEL_STEP :]


def load_audio(path: str | Path) -> np.ndarray:
    """Decode any audio PyAV can read to 16 kHz mono float32 in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"{path}: has no audio stream")
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: not a readable audio file ({exc})") from exc
    if not chunks:
        raise ValueError(f"{path}: contains no audio samples")
    return np.concatenate(chunks).astype(np.float32)
