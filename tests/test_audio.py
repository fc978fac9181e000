"""The mel front end equals the official audio.py, offline and streaming."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import scipy.signal

from wav2lip import audio
from wav2lip.audio import MelStream, mel_window, mel_windows, melspectrogram


def official_melspectrogram(wav: np.ndarray) -> np.ndarray:
    """The official audio.py, written with librosa and reflect padding as in librosa 0.7."""
    emphasised = scipy.signal.lfilter([1, -0.97], [1], wav)
    stft = librosa.stft(y=emphasised, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    mel_basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, mel_basis @ np.abs(stft))) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def test_matches_official_on_speech(speech_16k: np.ndarray) -> None:
    ours = melspectrogram(speech_16k)
    ref = official_melspectrogram(speech_16k)
    assert ours.shape == ref.shape == (80, 1 + len(speech_16k) // 200)
    assert np.abs(ours - ref).max() < 1e-3
    # Speech spans the range: the comparison is not between two flat arrays.
    assert ours.min() < -3 and ours.max() > 0


def test_reflect_not_zero_padding() -> None:
    """The first frames differ between reflect and zero padding; ours are reflect."""
    wav = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.3
    zero_padded = librosa.stft(
        y=scipy.signal.lfilter([1, -0.97], [1], wav),
        n_fft=800,
        hop_length=200,
        pad_mode="constant",
    )
    ours = melspectrogram(wav)
    ref = official_melspectrogram(wav)
    assert np.abs(ours[:, 0] - ref[:, 0]).max() < 1e-3
    mel_basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    zero_db = 20 * np.log10(np.maximum(1e-5, mel_basis @ np.abs(zero_padded[:, 0]))) - 20
    zero_first = np.clip(8 * ((zero_db + 100) / 100) - 4, -4, 4)
    assert np.abs(ours[:, 0] - zero_first).max() > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_offline_with_random_chunks(speech_16k: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stream = MelStream()
    pieces = []
    position = 0
    while position < len(speech_16k):
        size = int(rng.choice([1, 7, 199, 200, 320, 401, 960, 3000]))
        pieces.append(stream.push(speech_16k[position : position + size]))
        position += size
    streamed = np.concatenate(pieces, axis=1)
    offline = melspectrogram(speech_16k)
    final = (len(speech_16k) - 400) // 200 + 1  # frames whose window lies inside the audio
    assert streamed.shape[1] == final
    assert np.abs(streamed - offline[:, :final]).max() < 1e-5


def test_stream_emits_each_frame_as_soon_as_final() -> None:
    stream = MelStream()
    assert stream.push(np.zeros(400)).shape == (80, 0)
    assert stream.push(np.zeros(1)).shape == (80, 1)  # frame 0 reflects samples 1..400
    assert stream.push(np.zeros(198)).shape == (80, 0)
    assert stream.push(np.zeros(1)).shape == (80, 1)  # frame 1 needs 600 samples
    assert stream.push(np.zeros(400)).shape == (80, 2)


@pytest.mark.parametrize(
    ("alignment", "shift", "samples"), [("official", 0, 3400), ("training", 1, 2760)]
)
def test_lookahead_is_what_the_last_window_needs(alignment, shift, samples) -> None:
    needs = []
    for frame in range(1, 200):
        last_mel = int((frame - shift) * 80 / 25) + 15
        needs.append(last_mel * 200 + 400 - frame * 640)
    assert max(needs) == audio.lookahead_samples(alignment) == samples
    assert pytest.approx(samples / 16000) == audio.lookahead_seconds(alignment)


def test_training_window_rule() -> None:
    """As wav2lip_train.py pairs them: frame i with the window from frame i - 1's time
    (get_segmented_mels: start_frame_num = frame_id + 1, crop_audio_window(spec, i - 2))."""
    mel = np.arange(80 * 100, dtype=np.float32).reshape(80, 100) % 100
    starts = [int(80.0 * ((i + 1) - 2) / 25) for i in range(1, 30)]
    assert [audio.window_start(i, "training") for i in range(1, 30)] == starts
    assert starts[:6] == [0, 3, 6, 9, 12, 16]
    assert audio.window_start(0, "training") == 0  # no frame before the first
    assert [mel_window(mel, i)[0, 0] for i in (1, 2, 6)] == [0, 3, 16]  # the default
    windows = list(mel_windows(mel))
    assert [w[0, 0] for w in windows[:4]] == [0, 0, 3, 6]
    assert windows[-1][0, 0] == 84


def test_official_window_rule() -> None:
    mel = np.arange(80 * 100, dtype=np.float32).reshape(80, 100) % 100
    windows = list(mel_windows(mel, "official"))
    # The official loop: start = int(i * 3.2) until start + 16 > 100, then the last 16 frames.
    expected_starts = [int(i * 3.2) for i in range(100) if int(i * 3.2) + 16 <= 100]
    assert len(windows) == len(expected_starts) + 1
    for window, start in zip(windows, expected_starts):
        assert window.shape == (80, 16)
        assert window[0, 0] == start
    assert windows[-1][0, 0] == 84
    assert mel_window(mel, 5, "official")[0, 0] == 16
    assert mel_window(mel, 1000, "official")[0, 0] == 84
    with pytest.raises(ValueError, match="audio too short"):
        list(mel_windows(mel[:, :15], "official"))


def test_load_audio_resamples_to_16k_mono(speech_wav, tmp_path) -> None:
    samples = audio.load_audio(speech_wav)
    native, rate = librosa.load(speech_wav, sr=None)
    assert rate == 22050
    assert samples.dtype == np.float32
    assert abs(len(samples) - len(native) * 16000 / rate) < 200
    assert 0.05 < np.abs(samples).max() <= 1.0
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="not a readable audio file"):
        audio.load_audio(bad)
    with pytest.raises(FileNotFoundError):
        audio.load_audio(tmp_path / "absent.wav")
