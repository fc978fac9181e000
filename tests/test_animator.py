"""The weight-free animator: rests exactly in silence, opens the mouth with speech, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wav2lip.animator import TOP, AnimatedFace, Animator, mouth_opening
from wav2lip.audio import (
    MEL_STEP,
    N_MELS,
    SAMPLE_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    lookahead_samples,
    mel_windows,
    melspectrogram,
)
from wav2lip.faces import find_face, model_input, read_image

MOUTH = (slice(56, 84), slice(30, 66))  # rows and columns around the mouth and chin


@pytest.fixture(scope="module")
def face_input(faces_dir: Path) -> np.ndarray:
    image = read_image(faces_dir / "obama.jpg")
    return model_input(image, find_face(image))


@pytest.fixture(scope="module")
def face(face_input: np.ndarray) -> AnimatedFace:
    return Animator().prepare(face_input)


def windows(level: float, count: int = 1) -> np.ndarray:
    """`count` mel windows at one constant normalised level (-4 is silence, 4 the loudest)."""
    return np.full((count, N_MELS, MEL_STEP), level, dtype=np.float32)


def mouth_change(frames: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """Mean absolute difference from the resting crop around the mouth, per frame."""
    diff = frames[:, MOUTH[0], MOUTH[1]].astype(np.float64) - crop[MOUTH[0], MOUTH[1]]
    return np.abs(diff).mean(axis=(1, 2, 3))


def test_is_a_named_mouth_engine(face_input: np.ndarray) -> None:
    animator = Animator()
    assert animator.name == "animator"
    out = animator.infer(animator.prepare(face_input), windows(2.0, 5))
    assert out.shape == (5, 96, 96, 3)
    assert out.dtype == np.uint8
    assert animator.infer(animator.prepare(face_input), windows(2.0, 0)).shape == (0, 96, 96, 3)


def test_prepare_keeps_the_whole_crop(face_input: np.ndarray, face: AnimatedFace) -> None:
    expected = np.rint(face_input[3:].transpose(1, 2, 0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(face.crop, expected)


def test_rejects_bad_shapes(face: AnimatedFace) -> None:
    with pytest.raises(ValueError, match="mel windows"):
        Animator().infer(face, np.zeros((2, N_MELS, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="face input"):
        Animator().prepare(np.zeros((3, 96, 96), dtype=np.float32))


def test_silence_rests_on_the_unchanged_crop(face: AnimatedFace) -> None:
    out = Animator().infer(face, windows(-4.0, 3))
    for frame in out:
        np.testing.assert_array_equal(frame, face.crop)


def test_quiet_background_noise_keeps_the_mouth_shut(face: AnimatedFace) -> None:
    noise = np.random.default_rng(0).normal(0, 10 ** (-55 / 20), SAMPLE_RATE).astype(np.float32)
    mels = np.stack(list(mel_windows(melspectrogram(noise))))
    assert mels.max() > -4  # the noise is not silence to the mel
    np.testing.assert_array_equal(mouth_opening(mels), 0.0)
    np.testing.assert_array_equal(
        Animator().infer(face, mels), face.crop[None].repeat(len(mels), 0)
    )


def test_loud_window_opens_the_mouth_and_leaves_the_rest(face: AnimatedFace) -> None:
    (out,) = Animator().infer(face, windows(2.0))
    assert mouth_change(out[None], face.crop)[0] > 10
    np.testing.assert_array_equal(out[:40], face.crop[:40])
    np.testing.assert_array_equal(out[:TOP], face.crop[:TOP])
    # The warp fades out before the crop's sides and its bottom row, so the paste has no seam.
    np.testing.assert_array_equal(out[:, :8], face.crop[:, :8])
    np.testing.assert_array_equal(out[:, -8:], face.crop[:, -8:])
    np.testing.assert_array_equal(out[-1], face.crop[-1])
    # Between the lips the mouth is dark.
    seam = round(face.seam)
    gap = out[seam : seam + 4, 44:53].mean()
    assert gap < 0.6 * face.crop[seam : seam + 4, 44:53].mean()
    assert gap < 80


def test_opening_grows_with_loudness(face: AnimatedFace) -> None:
    levels = np.linspace(-4.0, 4.0, 81)
    opening = mouth_opening(windows(0.0, 81) + levels[:, None, None].astype(np.float32))
    assert opening[0] == 0.0 and opening[-1] == 1.0
    assert np.all(np.diff(opening) >= 0)
    assert np.unique(opening).size > 10  # graded, not a switch
    # And the picture follows: the louder, the darker and more changed the mouth.
    out = Animator().infer(face, windows(0.0, 4) + np.float32([-4, -1, 0, 1])[:, None, None])
    change = mouth_change(out, face.crop)
    assert change[0] == 0 and np.all(np.diff(change) > 1)


def test_weights_the_first_half_of_the_window() -> None:
    early, late = windows(-4.0, 1), windows(-4.0, 1)
    early[:, :, :8] = 1.0
    late[:, :, 8:] = 1.0
    assert mouth_opening(early)[0] > 0.5
    assert mouth_opening(late)[0] < 0.1


def test_mouth_follows_real_speech(speech_16k: np.ndarray, face: AnimatedFace) -> None:
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    wav = np.concatenate([silence, speech_16k, silence])
    mels = np.stack(list(mel_windows(melspectrogram(wav), "official")))
    out = Animator().infer(face, mels)
    change = mouth_change(out, face.crop)

    starts = np.arange(len(out)) * SAMPLES_PER_VIDEO_FRAME
    # Frames whose whole window (with its STFT reach) lies in the added silence rest exactly.
    reach = lookahead_samples("official")
    quiet = (starts + reach < len(silence)) | (starts - 400 >= len(wav) - len(silence))
    speech = (starts >= len(silence)) & (starts < len(wav) - len(silence))
    assert quiet.sum() > 30 and speech.sum() > 50
    np.testing.assert_array_equal(change[quiet], 0.0)
    assert change[speech].mean() > 10
    assert (change[speech] > 0).mean() > 0.8

    # Frame by frame, the mouth moves with the loudness of the audio just ahead of the frame.
    ahead = SAMPLE_RATE // 10
    rms = np.array([np.sqrt(np.mean(wav[s : s + ahead] ** 2)) for s in starts])
    assert np.corrcoef(change, 20 * np.log10(rms + 1e-4))[0, 1] > 0.7
