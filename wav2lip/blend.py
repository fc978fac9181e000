"""Pasting the generator's face back into the photo, once per video frame.

The official inference pastes the whole resized face box ("hard"), which shows the box's edges
and replaces the upper face with the generator's blurrier copy of it. The default ("feather")
takes only the mouth and chin from the generator, through a mask that is 0 on the box's border
and on the upper face and rises smoothly to 1 over the lower face, so no seam shows.

For a still photo the box never changes, so the mask is computed once per box; each frame then
costs one small resize and one blend of the lower face's region.
"""

from __future__ import annotations

import cv2
import numpy as np

from wav2lip.faces import FaceBox

MODES = ("feather", "hard")

# The mask's profile, in fractions of the box's height (top to bottom) and width. Official crops
# run from forehead to below the chin with the mouth at about 0.7 of the height; the generator
# draws the lower half. Ramps are smoothsteps, so the mask has no kinks, only gentle slopes.
# 0 above the nose tip, 1 from just above the upper lip. Starting at 0.52 keeps to the half of
# the face the generator draws (its input's lower half is masked), and lets the engine skip one
# more band of rows (it computes from row 47 of 96, see `first_face_row`).
_RISE_TOP = (0.52, 0.65)
_FALL_BOTTOM = (0.88, 1.0)  # 1 down to the chin, 0 on the box's bottom row
_SIDE = 0.18  # ramps from 0 on the left and right columns to 1 inside, clear of the mouth


def first_face_row(mode: str, size: int = 96) -> int:
    """The first row of the generated `size`x`size` face that can reach the picture.

    The feathered mask is 0 above `_RISE_TOP[0]` of the box, and resizing the face to the box
    reads at most one row above; two rows of margin cover the rounding of any box height. The
    engine need not compute the rows above this one.
    """
    return 0 if mode == "hard" else int(_RISE_TOP[0] * size) - 2


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 at `edge0`, 1 at `edge1` (either order), smooth in between; exact at both ends."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def feather_mask(width: int, height: int) -> np.ndarray:
    """The lower-face blending weights for a box of this size, (height, width) float32 in [0, 1].

    The border rows and columns are exactly 0 and the mouth's region exactly 1.
    """
    v = np.linspace(0.0, 1.0, height)
    u = np.linspace(0.0, 1.0, width)
    rows = smoothstep(*_RISE_TOP, v) * smoothstep(_FALL_BOTTOM[1], _FALL_BOTTOM[0], v)
    cols = smoothstep(0.0, _SIDE, u) * smoothstep(1.0, 1.0 - _SIDE, u)
    return np.outer(rows, cols).astype(np.float32)


def _to_uint8(face: np.ndarray) -> np.ndarray:
    """Generator output as uint8; floats in [0, 1] are truncated as official inference does."""
    if face.ndim != 3 or face.shape[2] != 3:
        raise ValueError(f"expected a generated face of shape (height, width, 3), got {face.shape}")
    if face.dtype == np.uint8:
        return face
    return (np.clip(face, 0.0, 1.0) * 255.0).astype(np.uint8)


class Blender:
    """Pastes generated faces into frames of one size at one fixed face box."""

    def __init__(self, box: FaceBox, frame_shape: tuple[int, ...], mode: str = "feather") -> None:
        if mode not in MODES:
            raise ValueError(f"blend mode must be one of {MODES}, not {mode!r}")
        height, width = frame_shape[:2]
        if box.area == 0 or box.clip(width, height) != box:
            raise ValueError(
                f"face box {box} is not a non-empty region of a {width}x{height} frame"
            )
        self.box, self.frame_shape, self.mode = box, tuple(frame_shape), mode
        if mode == "feather":
            mask = feather_mask(box.width, box.height)
            # Blend only where the mask is non-zero: the lower face, about a third of the box.
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            self._rows = slice(int(rows[0]), int(rows[-1]) + 1)
            self._cols = slice(int(cols[0]), int(cols[-1]) + 1)
            self._weights = np.ascontiguousarray(mask[self._rows, self._cols])
            self._inverse = 1.0 - self._weights

    def paste(self, frame: np.ndarray, face_out: np.ndarray) -> np.ndarray:
        """A copy of `frame` with `face_out` (BGR, float in [0, 1] or uint8) pasted at the box."""
        if frame.shape[:2] != self.frame_shape[:2] or frame.shape[2:] != (3,):
            raise ValueError(f"expected a BGR frame of shape {self.frame_shape}, got {frame.shape}")
        box = self.box
        generated = cv2.resize(_to_uint8(face_out), (box.width, box.height))
        out = frame.copy()
        region = out[box.y1 : box.y2, box.x1 : box.x2]
        if self.mode == "hard":
            region[...] = generated
            return out
        rows, cols = self._rows, self._cols
        region[rows, cols] = cv2.blendLinear(
            generated[rows, cols],
            region[rows, cols],
            self._weights,
            self._inverse,
        )
        return out
