"""The audio front end: 16 kHz samples to the mel spectrogram Wav2Lip was trained on.

This reproduces the official ``audio.py`` (with its ``hparams``) exactly: pre-emphasis 0.97, a
centred STFT (n_fft 800, hop 200, Hann window 800) with *reflect* padding as in the librosa 0.7
used for training, magnitude, 80 Slaney mel bands from 55 to 7600 Hz, ``20*log10(max(1e-5, x))
- 20`` dB, and symmetric normalisation to [-4, 4].

`MelStream` computes the same frames incrementally for live audio, and `mel_window` maps video
frames to mel windows, with either of two alignments:

- ``training``, the default: video frame i gets the 16 mel frames starting at frame i - 1's
  time, as Wav2Lip was trained (``wav2lip_train.py``: ``get_segmented_mels`` starts at
  ``frame_id + 1`` and crops ``i - 2``). It needs 2,760 samples (172.5 ms) of audio beyond a
  frame's start.
- ``official``, as the official ``inference.py``: the window starting at frame i itself, which
  shows each mouth 40 ms ahead of its sound and needs 3,400 samples (212.5 ms).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Literal

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

Alignment = Literal["training", "official"]
# How many video frames earlier than its frame a window starts.
_SHIFT = {"training": 1, "official": 0}


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=55, fmax=7600
    ).astype(np.float32)


def _normalize(db: np.ndarray) -> np.ndarray:
    """Levels in dB on this front end's scale to the model's [-MAX_ABS, MAX_ABS]."""
    normed = (2 * MAX_ABS) * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS
    return np.clip(normed, -MAX_ABS, MAX_ABS)


def mel_level(db: float) -> float:
    """The normalised mel value of a level in dB on this front end's scale (20 log10 - 20,
    where digital silence is at -100 dB and becomes -4)."""
    return float(_normalize(np.asarray(db)))


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
    return _normalize(db).astype(np.float32)


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


def window_start(frame: int, alignment: Alignment = "training") -> int:
    """The first mel frame of video frame `frame`'s window (the first frame's, under
    `training`, starts at 0: there is no frame before it)."""
    return max(0, int((frame - _SHIFT[alignment]) * MEL_PER_VIDEO_FRAME))


def samples_needed(frame: int, alignment: Alignment = "training") -> int:
    """Samples of audio video frame `frame` needs before its whole mel window is final.

    A mel frame t is centred on sample t*HOP and spans N_FFT samples: it is final once
    t*HOP + N_FFT//2 samples have arrived."""
    return (window_start(frame, alignment) + MEL_STEP - 1) * HOP + N_FFT // 2


@lru_cache(maxsize=2)
def lookahead_samples(alignment: Alignment = "training") -> int:
    """How far beyond a video frame's start (every frame's but the first) its window reaches:
    the least audio a live frame must wait for. The most is reached whenever the window's
    start is a whole number of mel frames: every fifth frame."""
    return max(
        samples_needed(frame, alignment) - frame * SAMPLES_PER_VIDEO_FRAME for frame in range(1, 11)
    )


def lookahead_seconds(alignment: Alignment = "training") -> float:
    return lookahead_samples(alignment) / SAMPLE_RATE


def mel_window(mel: np.ndarray, frame: int, alignment: Alignment = "training") -> np.ndarray:
    """Video frame `frame`'s mel window: (80, 16); past the end, the last 16 mel frames."""
    start = window_start(frame, alignment)
    if start + MEL_STEP > mel.shape[1]:
        return mel[:, mel.shape[1] - MEL_STEP :]
    return mel[:, start : start + MEL_STEP]


def mel_windows(mel: np.ndarray, alignment: Alignment = "training") -> Iterator[np.ndarray]:
    """Every video frame's window, as official inference does: until one would pass the end,
    which is replaced by the last 16 mel frames."""
    if mel.shape[1] < MEL_STEP:
        raise ValueError(
            f"audio too short: need at least {MEL_STEP} mel frames "
            f"({(MEL_STEP - 1) * HOP / SAMPLE_RATE:.2f} s), got {mel.shape[1]}"
        )
    frame = 0
    while window_start(frame, alignment) + MEL_STEP <= mel.shape[1]:
        yield mel_window(mel, frame, alignment)
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
