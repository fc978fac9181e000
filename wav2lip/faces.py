"""Finding the face in a still photo and building the generator's face input from it.

Everything here runs once per photo. Images are BGR uint8 arrays, as OpenCV reads them and as
Wav2Lip was trained. Wav2Lip was trained on face boxes from S3FD, so S3FD is used whenever its
weights are at hand; otherwise dlib's HOG detector, which ships inside its pip package and needs
no download, stands in, its box grown to approximate the box S3FD would have drawn.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import dlib
import numpy as np

log = logging.getLogger(__name__)

# dlib's box runs from the eyebrows to just above the chin (2-4% of its height above it on the
# test photos) and from cheek to cheek; S3FD's runs from the upper forehead to the chin and is
# a little wider. Grow dlib's box by these fractions of its height (top, bottom) and width (left,
# right) to approximate S3FD's: the top then sits near the hairline, and the bottom clears the
# chin, which Wav2Lip must see whole, before the official 10-pixel pad is added.
DLIB_TO_S3FD = (0.20, 0.08, 0.05, 0.05)


class NoFaceError(ValueError):
    """No face was found, so there is nothing to lip-sync."""


class DetectorLoadError(RuntimeError):
    """The S3FD weights file exists but cannot be loaded."""


@dataclass(frozen=True)
class FaceBox:
    """A face region in pixels: columns x1..x2-1 and rows y1..y2-1, as in `image[y1:y2, x1:x2]`."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def clip(self, width: int, height: int) -> FaceBox:
        """The part of this box inside a `width` x `height` image (empty if none)."""
        return FaceBox(
            min(max(self.x1, 0), width),
            min(max(self.y1, 0), height),
            min(max(self.x2, 0), width),
            min(max(self.y2, 0), height),
        )


class FaceDetector(Protocol):
    """A face detector; `name` says which one, since the fallback changes the boxes."""

    name: str

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Boxes in `image`'s pixels, unclipped and in no particular order."""
        ...


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """A copy whose longer side is at most `max_side`, and the factor it was scaled by."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image, 1.0
    size = (max(round(width * scale), 1), max(round(height * scale), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


class DlibDetector:
    """dlib's HOG frontal face detector with boxes grown to approximate S3FD's."""

    name = "dlib"
    # HOG on a copy at most this large, upsampled once, finds faces down to about 40 pixels there
    # (3% of the longer side) in well under a second.
    max_side = 1280
    upsample = 1

    def __init__(self) -> None:
        self._detector = dlib.get_frontal_face_detector()

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        small, scale = _downscale(image, self.max_side)
        rects = self._detector(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), self.upsample)
        top, bottom, left, right = DLIB_TO_S3FD
        boxes = []
        for rect in rects:
            # dlib's right and bottom are inclusive.
            x1, y1 = rect.left() / scale, rect.top() / scale
            x2, y2 = (rect.right() + 1) / scale, (rect.bottom() + 1) / scale
            width, height = x2 - x1, y2 - y1
            boxes.append(
                FaceBox(
                    round(x1 - left * width),
                    round(y1 - top * height),
                    round(x2 + right * width),
                    round(y2 + bottom * height),
                )
            )
        return boxes


class S3FDDetector:
    """face-alignment's S3FD, fed what the official Wav2Lip fed its own copy of it."""

    name = "s3fd"
    # Official inference detects at full resolution; beyond 1080p that costs gigabytes of
    # activations on the CPU while S3FD still finds faces of 16 pixels on the smaller copy.
    max_side = 1920

    def __init__(self, path: Path, device: str = "cpu") -> None:
        if not path.is_file():
            raise FileNotFoundError(f"S3FD weights not found at {path}")
        # Imported here: face-alignment takes seconds to import and is needed only with weights.
        from face_alignment.detection.sfd.sfd_detector import SFDDetector

        try:
            self._net = SFDDetector(device, path_to_detector=str(path))
        except Exception as exc:  # torch.load and load_state_dict fail in many ways
            raise DetectorLoadError(
                f"cannot load S3FD weights from {path} ({type(exc).__name__}: {exc}); "
                "delete the file to download it again, or to detect faces with dlib instead"
            ) from exc

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        small, scale = _downscale(image, self.max_side)
        # face-alignment flips its input's channels before the network, expecting RGB. The
        # official Wav2Lip flipped its BGR frames to RGB and fed them to the network unflipped
        # (with the BGR means subtracted), in training as in inference. Passing the BGR image
        # unchanged here makes face-alignment's flip feed the network exactly that.
        boxes = []
        for x1, y1, x2, y2, _score in self._net.detect_from_image(small):
            if not np.isfinite([x1, y1, x2, y2]).all():
                continue
            # Clipped at 0 and truncated to ints, as the official code does.
            x1, y1, x2, y2 = (max(float(v), 0.0) / scale for v in (x1, y1, x2, y2))
            boxes.append(FaceBox(int(x1), int(y1), int(x2), int(y2)))
        return boxes


@functools.cache
def _dlib_detector() -> DlibDetector:
    return DlibDetector()


@functools.cache
def _s3fd_detector(path: Path, device: str) -> S3FDDetector:
    return S3FDDetector(path, device)


def get_detector(s3fd_path: Path | None = None, device: str = "cpu") -> FaceDetector:
    """S3FD with the weights at `s3fd_path`, else dlib; built on first use and then reused."""
    if s3fd_path is None:
        return _dlib_detector()
    return _s3fd_detector(Path(s3fd_path).resolve(), device)


def _check_image(image: np.ndarray) -> tuple[int, int]:
    """The (height, width) of a BGR uint8 image, which is all this module accepts."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError("expected a BGR uint8 image of shape (height, width, 3)")
    if image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(
            f"expected a BGR uint8 image of shape (height, width, 3), got {image.shape}"
        )
    return image.shape[0], image.shape[1]


def read_image(path: str | Path) -> np.ndarray:
    """Read a photo as BGR uint8, failing with a message that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"photo not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read {path} as an image; use a JPEG or PNG photo")
    return image


def detect_faces(
    image: np.ndarray, s3fd_path: Path | None = None, device: str = "cpu"
) -> list[FaceBox]:
    """All faces in `image`, clipped to it, largest first."""
    height, width = _check_image(image)
    detector = get_detector(s3fd_path, device)
    boxes = [box.clip(width, height) for box in detector.detect(image)]
    boxes = sorted((box for box in boxes if box.area > 0), key=lambda box: box.area, reverse=True)
    log.debug("%s found %d face(s): %s", detector.name, len(boxes), boxes)
    return boxes


def find_face(
    image: np.ndarray,
    box: FaceBox | tuple[int, int, int, int] | None = None,
    pads: tuple[int, int, int, int] = (0, 10, 0, 0),
    s3fd_path: Path | None = None,
    device: str = "cpu",
) -> FaceBox:
    """The region to lip-sync: the largest face, padded and clipped as official inference does.

    `pads` are (top, bottom, left, right) pixels; the official default pads 10 pixels below so
    the chin is included. An explicit `box` (x1, y1, x2, y2) skips detection and, as the official
    `--box` option, is used unpadded (clipped to the image).
    """
    height, width = _check_image(image)
    if box is not None:
        coords = (box.x1, box.y1, box.x2, box.y2) if isinstance(box, FaceBox) else box
        chosen = FaceBox(*(int(v) for v in coords)).clip(width, height)
        if chosen.area == 0:
            raise ValueError(f"face box {box} has no area inside the {width}x{height} image")
        return chosen
    faces = detect_faces(image, s3fd_path, device)
    if not faces:
        raise NoFaceError(
            "no face found in the photo: use a well-lit photo with one face looking at the "
            "camera, or give the face's box (x1, y1, x2, y2) explicitly"
        )
    face = faces[0]
    top, bottom, left, right = pads
    padded = FaceBox(
        max(0, face.x1 - left),
        max(0, face.y1 - top),
        min(width, face.x2 + right),
        min(height, face.y2 + bottom),
    )
    if padded.area == 0:
        raise ValueError(f"pads {pads} leave nothing of the face box {face}")
    return padded


def model_input(image: np.ndarray, box: FaceBox, size: int = 96) -> np.ndarray:
    """The generator's face input, (6, size, size) float32 in [0, 1], built as officially.

    The crop is resized to size x size; the first three channels are that face with its lower
    half (which the generator must draw) zeroed, the last three the whole face, both BGR.
    """
    height, width = _check_image(image)
    if box.clip(width, height) != box or box.area == 0:
        raise ValueError(f"face box {box} is not a non-empty region of the {width}x{height} image")
    face = cv2.resize(image[box.y1 : box.y2, box.x1 : box.x2], (size, size))
    masked = face.copy()
    masked[size // 2 :] = 0
    stacked = np.concatenate([masked, face], axis=2).transpose(2, 0, 1)
    # Divided in float64 and then narrowed, as official inference does.
    return (stacked / 255.0).astype(np.float32)


def face_crop(face_input: np.ndarray) -> np.ndarray:
    """The unmasked face of a model input, back as the (96, 96, 3) uint8 BGR crop."""
    return np.rint(face_input[3:].transpose(1, 2, 0) * 255.0).astype(np.uint8)
