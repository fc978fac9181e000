"""Pasting generated faces back: the official hard paste and the seamless feathered default."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wav2lip.blend import Blender, feather_mask, first_face_row
from wav2lip.faces import FaceBox, read_image

# The padded face box that detection gives for obama.jpg, fixed so these tests need no detector.
OBAMA_BOX = FaceBox(336, 88, 631, 441)


@pytest.fixture(scope="module")
def obama(faces_dir: Path) -> np.ndarray:
    return read_image(faces_dir / "obama.jpg")


@pytest.fixture
def generated() -> np.ndarray:
    """A stand-in for the generator's output: noise, so every pasted pixel shows."""
    return np.random.default_rng(0).random((96, 96, 3), dtype=np.float32)


@pytest.mark.parametrize(("width", "height"), [(295, 353), (120, 140), (96, 96)])
def test_feather_mask_is_zero_at_the_border_and_one_at_the_mouth(width: int, height: int) -> None:
    mask = feather_mask(width, height)
    assert mask.shape == (height, width) and mask.dtype == np.float32
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert not mask[0].any() and not mask[-1].any()
    assert not mask[:, 0].any() and not mask[:, -1].any()
    assert not mask[: int(0.45 * height)].any()  # the upper face stays the photo's
    # The mouth and chin, around the centre of the lower half, come from the generator alone.
    assert (
        mask[int(0.65 * height) : int(0.85 * height), int(0.3 * width) : int(0.7 * width)] == 1
    ).all()
    # Smooth: no step between neighbours larger than the steepest ramp of its size allows.
    steepest = 1.5 / (0.12 * (min(width, height) - 1))
    assert np.abs(np.diff(mask, axis=0)).max() <= steepest
    assert np.abs(np.diff(mask, axis=1)).max() <= steepest


def test_feather_paste_is_seamless(obama: np.ndarray, generated: np.ndarray) -> None:
    box = OBAMA_BOX
    blender = Blender(box, obama.shape)
    before = obama.copy()
    out = blender.paste(obama, generated)
    np.testing.assert_array_equal(obama, before)  # a new frame; the photo is untouched
    assert out.shape == obama.shape and out.dtype == np.uint8

    outside = np.ones(obama.shape[:2], bool)
    outside[box.y1 : box.y2, box.x1 : box.x2] = False
    np.testing.assert_array_equal(out[outside], obama[outside])

    change = np.abs(out.astype(int) - obama.astype(int))[box.y1 : box.y2, box.x1 : box.x2]
    for edge in (change[0], change[-1], change[:, 0], change[:, -1]):
        assert edge.max() <= 1
    assert change[: int(0.45 * box.height)].max() == 0  # the upper face is the photo's

    pasted = cv2.resize((generated * 255).astype(np.uint8), (box.width, box.height))
    centre_y, centre_x = box.y1 + int(0.75 * box.height), box.x1 + box.width // 2
    np.testing.assert_array_equal(
        out[centre_y - 10 : centre_y + 10, centre_x - 20 : centre_x + 20],
        pasted[
            centre_y - box.y1 - 10 : centre_y - box.y1 + 10,
            box.width // 2 - 20 : box.width // 2 + 20,
        ],
    )


def test_feather_paste_takes_float_or_uint8(obama: np.ndarray, generated: np.ndarray) -> None:
    blender = Blender(OBAMA_BOX, obama.shape)
    as_uint8 = (generated * 255).astype(np.uint8)
    np.testing.assert_array_equal(blender.paste(obama, generated), blender.paste(obama, as_uint8))


@pytest.mark.parametrize("as_uint8", [False, True])
def test_hard_paste_is_the_official_formula(
    obama: np.ndarray, generated: np.ndarray, as_uint8: bool
) -> None:
    box = OBAMA_BOX
    face = (generated * 255).astype(np.uint8) if as_uint8 else generated
    out = Blender(box, obama.shape, mode="hard").paste(obama, face)

    expected = obama.copy()
    x1, y1, x2, y2 = box.x1, box.y1, box.x2, box.y2
    p = cv2.resize((generated * 255).astype(np.uint8), (x2 - x1, y2 - y1))
    expected[y1:y2, x1:x2] = p
    np.testing.assert_array_equal(out, expected)


def test_invalid_arguments_are_rejected(obama: np.ndarray, generated: np.ndarray) -> None:
    with pytest.raises(ValueError, match="blend mode"):
        Blender(OBAMA_BOX, obama.shape, mode="poisson")
    with pytest.raises(ValueError, match="not a non-empty region"):
        Blender(FaceBox(800, 88, 1000, 441), obama.shape)
    blender = Blender(OBAMA_BOX, obama.shape)
    with pytest.raises(ValueError, match="frame of shape"):
        blender.paste(obama[:500], generated)
    with pytest.raises(ValueError, match="generated face"):
        blender.paste(obama, generated[..., 0])


@pytest.mark.parametrize("height", [97, 150, 209, 333, 480])
def test_rows_above_first_face_row_never_reach_the_picture(height: int) -> None:
    frame = np.full((720, 1280, 3), 90, np.uint8)
    box = FaceBox(400, 100, 400 + height * 5 // 6, 100 + height)
    blender = Blender(box, frame.shape)
    face = np.random.default_rng(height).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    other = face.copy()
    top = first_face_row("feather")
    other[:top] = 255 - other[:top]
    assert np.array_equal(blender.paste(frame, face), blender.paste(frame, other))
    # And the row itself does matter: the bound is not loose by much.
    other[top + 3] = 255 - other[top + 3]
    assert not np.array_equal(blender.paste(frame, face), blender.paste(frame, other))
    assert first_face_row("hard") == 0
