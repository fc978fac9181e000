"""Face detection, face boxes and the generator's face input, on real photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wav2lip import faces
from wav2lip.faces import (
    DetectorLoadError,
    FaceBox,
    NoFaceError,
    detect_faces,
    find_face,
    get_detector,
    model_input,
    read_image,
)

PHOTOS = [
    "obama.jpg",
    "obama-720p.jpg",
    "biden.jpg",
    "lin-manuel-miranda.png",
    "two_people.jpg",
    "obama_partial_face.jpg",
]


@pytest.fixture(scope="module")
def photos(faces_dir: Path) -> dict[str, np.ndarray]:
    return {name: read_image(faces_dir / name) for name in PHOTOS}


@pytest.fixture(scope="module")
def detections(photos: dict[str, np.ndarray]) -> dict[str, list[FaceBox]]:
    """dlib's faces in every photo, detected once for the whole module."""
    return {name: detect_faces(image) for name, image in photos.items()}


def _contains(box: FaceBox, x: int, y: int) -> bool:
    return box.x1 <= x < box.x2 and box.y1 <= y < box.y2


def _inside(box: FaceBox, image: np.ndarray) -> bool:
    height, width = image.shape[:2]
    return 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height


@pytest.mark.parametrize("name", PHOTOS)
def test_dlib_finds_a_face_in_every_photo(
    name: str, photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    assert get_detector().name == "dlib"
    found = detections[name]
    assert found, name
    assert all(_inside(box, photos[name]) for box in found)
    assert [box.area for box in found] == sorted((box.area for box in found), reverse=True)


def test_obama_box_covers_forehead_to_chin(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    image, box = photos["obama.jpg"], detections["obama.jpg"][0]
    width = image.shape[1]
    assert width / 3 < (box.x1 + box.x2) / 2 < 2 * width / 3
    # Points read off the photo: both eyes, the mouth, the cheeks and the bottom of the chin.
    for x, y in [(445, 210), (550, 210), (495, 325), (380, 300), (605, 300), (495, 414)]:
        assert _contains(box, x, y), (x, y)
    assert box.y1 > 40  # not far above the hairline (about y=80)
    assert box.height < 1.5 * box.width


def test_small_face_in_tall_photo_is_found(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    image, found = photos["biden.jpg"], detections["biden.jpg"]
    assert len(found) == 1
    box = found[0]
    assert box.height < 0.25 * image.shape[0]
    for x, y in [(530, 330), (650, 335), (590, 465), (590, 574)]:
        assert _contains(box, x, y), (x, y)


def test_two_people_picks_the_largest(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    image, found = photos["two_people.jpg"], detections["two_people.jpg"]
    assert len(found) == 2
    assert found[0].area > found[1].area
    left, right = sorted(found, key=lambda box: box.x1)
    assert left.x2 < image.shape[1] / 2 < right.x1
    chosen = find_face(image)  # the larger face is on the right
    assert chosen == FaceBox(right.x1, right.y1, right.x2, right.y2 + 10)


def test_partial_face_is_clipped_to_the_photo(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    image, box = photos["obama_partial_face.jpg"], detections["obama_partial_face.jpg"][0]
    assert box.x1 == 0  # the face is cut by the left edge
    assert _inside(box, image)


def test_large_photo_is_detected_downscaled_and_mapped_back(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]]
) -> None:
    image = photos["obama-720p.jpg"]
    big = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2))
    small_box, big_box = detections["obama-720p.jpg"][0], detect_faces(big)[0]
    for small, large in zip(
        (small_box.x1, small_box.y1, small_box.x2, small_box.y2),
        (big_box.x1, big_box.y1, big_box.x2, big_box.y2),
        strict=True,
    ):
        assert abs(2 * small - large) < 0.1 * small_box.width


def test_detected_box_is_padded_as_officially(
    photos: dict[str, np.ndarray], detections: dict[str, list[FaceBox]], monkeypatch
) -> None:
    image, box = photos["obama.jpg"], detections["obama.jpg"][0]
    monkeypatch.setattr(faces, "detect_faces", lambda *args: [box])
    assert find_face(image) == FaceBox(box.x1, box.y1, box.x2, box.y2 + 10)


def test_pads_are_applied_and_clipped(monkeypatch) -> None:
    image = np.zeros((200, 300, 3), np.uint8)
    monkeypatch.setattr(faces, "detect_faces", lambda *args: [FaceBox(50, 5, 150, 190)])
    # (top, bottom, left, right): the top and bottom run past the image and are clipped.
    assert find_face(image, pads=(10, 20, 30, 40)) == FaceBox(20, 0, 190, 200)
    with pytest.raises(ValueError, match="pads"):
        find_face(image, pads=(-100, -100, 0, 0))


def test_explicit_box_skips_detection(monkeypatch) -> None:
    def fail(*args: object) -> list[FaceBox]:
        raise AssertionError("detection ran despite an explicit box")

    monkeypatch.setattr(faces, "detect_faces", fail)
    image = np.zeros((200, 300, 3), np.uint8)
    assert find_face(image, box=(10, 20, 110, 140)) == FaceBox(10, 20, 110, 140)
    assert find_face(image, box=FaceBox(250, -5, 350, 90)) == FaceBox(250, 0, 300, 90)
    with pytest.raises(ValueError, match="no area"):
        find_face(image, box=(400, 0, 500, 100))


@pytest.mark.parametrize("kind", ["black", "flat", "noise"])
def test_photo_without_a_face_raises(kind: str) -> None:
    rng = np.random.default_rng(0)
    image = {
        "black": np.zeros((240, 320, 3), np.uint8),
        "flat": np.full((240, 320, 3), (40, 160, 220), np.uint8),
        "noise": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
    }[kind]
    with pytest.raises(NoFaceError, match="no face found") as raised:
        find_face(image)
    assert isinstance(raised.value, ValueError)


def test_model_input_is_built_as_officially(photos: dict[str, np.ndarray]) -> None:
    image, box = photos["obama.jpg"], FaceBox(336, 88, 631, 441)
    face = model_input(image, box)
    assert face.shape == (6, 96, 96) and face.dtype == np.float32
    assert face.min() >= 0.0 and face.max() <= 1.0
    assert not face[:3, 48:].any()
    resized = cv2.resize(image[88:441, 336:631], (96, 96))
    np.testing.assert_array_equal(face[3:], (resized.transpose(2, 0, 1) / 255.0).astype(np.float32))
    np.testing.assert_array_equal(face[:3, :48], face[3:, :48])
    # The official batch, (B, H, W, 6) in float64, as the generator received it.
    masked = resized.copy()
    masked[48:] = 0
    official = np.concatenate((masked[None], resized[None]), axis=3) / 255.0
    expected = torch.FloatTensor(np.transpose(official, (0, 3, 1, 2)))[0].numpy()
    np.testing.assert_array_equal(face, expected)


def test_model_input_rejects_a_box_outside_the_image() -> None:
    with pytest.raises(ValueError, match="not a non-empty region"):
        model_input(np.zeros((100, 100, 3), np.uint8), FaceBox(50, 50, 150, 90))


def test_read_image(faces_dir: Path, tmp_path: Path) -> None:
    image = read_image(faces_dir / "lin-manuel-miranda.png")  # stored with an alpha channel
    assert image.dtype == np.uint8 and image.shape == (612, 704, 3)
    with pytest.raises(FileNotFoundError, match="photo not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not a photo")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "notes.jpg")


def test_non_bgr_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="BGR uint8"):
        detect_faces(np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="BGR uint8"):
        detect_faces(np.zeros((100, 100, 3), np.float32))


@pytest.fixture(scope="module")
def random_s3fd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An S3FD weights file with random weights: the real one cannot be downloaded here."""
    from face_alignment.detection.sfd.net_s3fd import s3fd

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "s3fd-619a316812.pth"
    torch.save(s3fd().state_dict(), path)
    return path


def test_s3fd_weights_are_loaded_and_run(random_s3fd: Path, photos: dict[str, np.ndarray]) -> None:
    detector = get_detector(random_s3fd)
    assert detector.name == "s3fd"
    assert get_detector(random_s3fd) is detector  # built once
    image = cv2.resize(photos["obama.jpg"], (182, 227))
    # Random weights find only noise; what matters is that S3FD ran and its boxes are valid.
    for box in detect_faces(image, s3fd_path=random_s3fd):
        assert _inside(box, image)


def test_s3fd_is_fed_bgr_unchanged_and_boxes_mapped_back(random_s3fd: Path, monkeypatch) -> None:
    """face-alignment flips channels itself; the official code's network saw BGR flipped once."""
    seen: list[np.ndarray] = []

    def spy(image: np.ndarray) -> list[np.ndarray]:
        seen.append(image)
        # A face in the downscaled copy's pixels, and one the network got wrong.
        return [np.array([100.0, 50.0, 200.0, 150.0, 0.9]), np.array([np.nan, 0, 10, 10, 0.8])]

    detector = get_detector(random_s3fd)
    monkeypatch.setattr(detector._net, "detect_from_image", spy)
    image = np.zeros((800, 600, 3), np.uint8)
    image[..., 0] = 200  # blue, in BGR
    assert detect_faces(image, s3fd_path=random_s3fd) == [FaceBox(100, 50, 200, 150)]
    assert seen[-1] is image
    big = np.zeros((2160, 3840, 3), np.uint8)  # S3FD runs on a copy at most 1920 pixels wide
    assert detect_faces(big, s3fd_path=random_s3fd) == [FaceBox(200, 100, 400, 300)]
    assert seen[-1].shape == (1080, 1920, 3)


def test_s3fd_missing_or_corrupt_weights_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="S3FD weights not found"):
        get_detector(tmp_path / "s3fd-619a316812.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorLoadError, match="cannot load S3FD weights"):
        get_detector(corrupt)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DetectorLoadError, match="delete the file"):
        get_detector(wrong)
