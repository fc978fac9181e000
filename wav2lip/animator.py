"""A weight-free mouth animator: the photo's own lower face, warped open as speech gets loud.

Where no Wav2Lip weights can be had, this still drives the whole product. It is no lip-reading
model: each mel window gives only a mouth opening (how loud the speech is), and the opening
drops the jaw and lower lip of the photo's 96x96 crop and shows a dark mouth interior between
the lips. Silence leaves the crop exactly as it is, so a quiet speaker shows the photo itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import librosa
import numpy as np

from wav2lip.audio import MAX_ABS, MEL_STEP, MIN_LEVEL_DB, N_MELS
from wav2lip.blend import smoothstep
from wav2lip.faces import face_crop

SIZE = 96

# Loudness: the mean power of the bands where speech's energy lies, per mel frame, mapped to an
# opening and averaged over the frames that Wav2Lip's alignment ties to a video frame. Frame i's
# window starts at the frame's own time and spans 0.2 s; the sound it shows lies in the window's
# first half (and lips move a little ahead of the sound), so the weights are a Hann bump over
# frames 0-8, peaking 50 ms in. Averaging openings rather than power keeps a loud frame at the
# bump's edge from opening the mouth by itself.
SPEECH_HZ = (300.0, 3000.0)
FRAME_WEIGHTS = np.zeros(MEL_STEP, dtype=np.float64)
FRAME_WEIGHTS[:9] = np.hanning(11)[1:-1]
FRAME_WEIGHTS /= FRAME_WEIGHTS.sum()
# A frame's level (dB on the mel's own scale, so silence is -100) to its opening: closed up to
# QUIET_DB, which also keeps background noise up to about -45 dBFS shut, fully open from LOUD_DB,
# which speech at a normal -20 dBFS reaches on its vowels. A smoothstep in between.
QUIET_DB, LOUD_DB = -72.0, -40.0

# Geometry of a 96x96 crop from an S3FD-like box (padded 10 px below): the mouth is centred on
# column 48 with the lips' seam around rows 62-70, the chin near row 88.
MOUTH_COL = 48
SEAM_PRIOR, SEAM_SPREAD, SEAM_RANGE = 66.0, 5.0, (60, 72)  # per-photo estimate of the seam row
SEAM_SEARCH = (56, 78)  # rows searched for the lips' edges, columns MOUTH_COL +- 8
GAP_HALF_WIDTH = 12.0  # half-width of the opening between the lips at its widest
JAW_FLAT, JAW_EDGE = 16.0, 40.0  # the jaw moves whole within this many columns of the centre
DROP = 6.0  # px the lower lip and jaw drop at full opening
LIFT = 0.3 * DROP  # px the upper lip rises at full opening
UPPER_LIP, NOSE = 4, 12  # the upper lip (rows above the seam) moves whole; the nose not at all
CHEEK_RAMP = 14  # rows below the seam over which the cheeks beside the mouth stretch
CHIN_MARGIN = 84  # the jaw moves whole down to here and then fades to 0 at the bottom row
FEATHER = 1.5  # px of soft edge on the mouth interior
INTERIOR_SHADE = 0.3  # the interior's colour: the mouth region's mean colour darkened
TOP = SEAM_RANGE[0] - NOSE  # rows above this are never touched


def _speech_bands() -> np.ndarray:
    """Which of the 80 Slaney mel bands (55-7600 Hz) are centred in the speech range."""
    centres = librosa.mel_frequencies(N_MELS + 2, fmin=55, fmax=7600)[1:-1]
    return (centres >= SPEECH_HZ[0]) & (centres <= SPEECH_HZ[1])


SPEECH_BANDS = _speech_bands()


def mouth_opening(mels: np.ndarray) -> np.ndarray:
    """Mel windows (B, 80, 16) to openings (B,) in [0, 1]: 0 exactly in silence, 1 when loud."""
    mels = np.asarray(mels, dtype=np.float64)
    if mels.ndim != 3 or mels.shape[1:] != (N_MELS, MEL_STEP):
        raise ValueError(
            f"expected mel windows of shape (B, {N_MELS}, {MEL_STEP}), got {mels.shape}"
        )
    # Undo the normalisation to dB of magnitude (-100 is silence), then average power.
    db = (mels[:, SPEECH_BANDS] + MAX_ABS) * (-MIN_LEVEL_DB / (2 * MAX_ABS)) + MIN_LEVEL_DB
    level = 10.0 * np.log10(np.power(10.0, db / 10.0).mean(axis=1))
    return smoothstep(QUIET_DB, LOUD_DB, level) @ FRAME_WEIGHTS


def find_seam(crop: np.ndarray) -> float:
    """The row where the lips meet in a 96x96 crop, as the centroid of strong horizontal edges
    around the mouth, drawn towards the usual row so a chin or nostril shadow cannot win."""
    gray = crop.astype(np.float64).mean(axis=2)
    cols = slice(MOUTH_COL - 8, MOUTH_COL + 9)
    edges = np.abs(np.diff(gray[:, cols], axis=0)).mean(axis=1)  # edge r lies at row r + 0.5
    rows = np.arange(*SEAM_SEARCH)
    weights = edges[rows] ** 2 * np.exp(-0.5 * ((rows + 0.5 - SEAM_PRIOR) / SEAM_SPREAD) ** 2)
    if weights.sum() <= 0:
        return SEAM_PRIOR
    return float(np.clip((weights * (rows + 0.5)).sum() / weights.sum(), *SEAM_RANGE))


@dataclass
class AnimatedFace:
    """Per-photo state: the crop and everything about its warp that the opening only scales."""

    crop: np.ndarray  # (96, 96, 3) uint8 BGR, the resting mouth
    seam: float  # row where the lips meet
    field: np.ndarray  # (rows, 96) float32: source row offset per px of drop, rows TOP..95
    gap: np.ndarray  # (96,) float32: the gap's height profile across columns, 1 at the centre
    interior: np.ndarray  # (3,) float32 BGR colour of the open mouth


class Animator:
    """Opens and closes the photo's mouth with the speech's loudness; needs no weights."""

    name = "animator"

    def prepare(self, face_input: np.ndarray) -> AnimatedFace:
        """Take the whole crop from the (6, 96, 96) model input and build its warp once."""
        if face_input.shape != (6, SIZE, SIZE):
            raise ValueError(f"expected a (6, {SIZE}, {SIZE}) face input, got {face_input.shape}")
        crop = face_crop(face_input)
        seam = find_seam(crop)
        y = np.arange(TOP, SIZE, dtype=np.float64)[:, None]
        dx = np.abs(np.arange(SIZE, dtype=np.float64) - MOUTH_COL)
        # The gap between the lips is an ellipse: its height across columns is this profile.
        gap = np.sqrt(np.clip(1.0 - (dx / GAP_HALF_WIDTH) ** 2, 0.0, None))
        jaw = smoothstep(JAW_EDGE, JAW_FLAT, dx)
        below = y >= seam
        # Below the seam the lower lip drops rigidly where the gap opens and the cheeks beside
        # it stretch smoothly; above, the upper lip rises. Both fade out before the nose, the
        # crop's sides and its bottom row. Offsets are positive where a pixel moves down.
        lower = gap * below + (jaw - gap) * smoothstep(seam, seam + CHEEK_RAMP, y)
        lower *= smoothstep(SIZE - 1, CHIN_MARGIN, y)
        upper = gap * ~below * smoothstep(seam - NOSE, seam - UPPER_LIP, y)
        field = lower - (LIFT / DROP) * upper
        mouth = crop[round(seam) - 4 : round(seam) + 5, MOUTH_COL - 8 : MOUTH_COL + 9]
        interior = INTERIOR_SHADE * mouth.reshape(-1, 3).mean(axis=0)
        return AnimatedFace(
            crop,
            seam,
            field.astype(np.float32),
            gap.astype(np.float32),
            interior.astype(np.float32),
        )

    def infer(self, face: AnimatedFace | Sequence[AnimatedFace], mels: np.ndarray) -> np.ndarray:
        """Mel windows (B, 80, 16) to mouth crops (B, 96, 96, 3) uint8 BGR, for one photo or
        one photo per window (the scheduler batches several sessions)."""
        if isinstance(face, AnimatedFace):
            return self._animate(face, mels)
        out = np.empty((len(mels), SIZE, SIZE, 3), np.uint8)
        for photo in {id(f): f for f in face}.values():
            rows = [i for i, f in enumerate(face) if f is photo]
            out[rows] = self._animate(photo, mels[rows])
        return out

    def _animate(self, face: AnimatedFace, mels: np.ndarray) -> np.ndarray:
        drops = (DROP * mouth_opening(mels)).astype(np.float32)
        out = np.repeat(face.crop[None], len(drops), axis=0)
        moving = np.flatnonzero(drops > 0)
        if moving.size == 0:
            return out
        d = drops[moving, None, None]
        rows = np.arange(TOP, SIZE, dtype=np.float32)[:, None]
        # Where each output pixel samples the crop: above itself by the drop's offset.
        map_y = rows - d * face.field
        map_x = np.broadcast_to(np.arange(SIZE, dtype=np.float32), map_y.shape[1:])
        # The interior fills the gap from the risen upper lip to the dropped lower lip.
        top = face.seam - d * (LIFT / DROP) * face.gap
        bottom = face.seam + d * face.gap
        inside = np.minimum(rows - top, bottom - rows) / FEATHER + 0.5
        # A gap thinner than a pixel or two shows only faintly, so opening starts smoothly.
        alpha = np.clip(inside, 0.0, 1.0) * np.clip((bottom - top) / 2.0, 0.0, 1.0)
        alpha = alpha[..., None]
        for i, frame in enumerate(moving):
            warped = cv2.remap(
                face.crop, map_x, map_y[i], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            blended = warped * (1.0 - alpha[i]) + face.interior * alpha[i]
            out[frame, TOP:] = np.rint(blended).astype(np.uint8)
        return out
