"""Avatars: the photos that sessions animate, checked, fitted to the video size and analysed once.

A photo is untrusted input. Its type is decided by its bytes (Pillow, limited to JPEG, PNG and
WebP), never by the label the client put on it; its pixel count is read from the header and
refused above a limit before anything is decoded, so a small file claiming huge dimensions (a
decompression bomb) costs nothing. Decoding and face detection take up to a second, so they run
on a worker thread, never on the event loop.

A worker keeps the avatars it has analysed by content id (the front door names each photo by a
hash of its bytes), so a photo is analysed once per worker however many sessions use it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from wav2lip.faces import FaceBox, NoFaceError, find_face, model_input
from wav2lip.weights import DETECTOR, find_cached

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# Below this the face would be a few pixels tall: nothing worth animating.
MIN_SIDE = 64

FaceFinder = Callable[[np.ndarray], FaceBox]


class PhotoError(ValueError):
    """A photo that cannot be an avatar. `code` says why: not_an_image, too_many_pixels,
    image_too_small or no_face; the message says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PhotoLimits:
    max_pixels: int = 40_000_000  # 40 MP is already 120 MB of pixels
    video_max_width: int = 1280
    video_max_height: int = 720


@dataclass(frozen=True, eq=False)
class Avatar:
    """A photo ready for sessions. `image` (BGR uint8, even width and height: the video size)
    and `face_input` are read-only, because every session using this avatar shares them."""

    id: str
    image: np.ndarray
    box: FaceBox
    face_input: np.ndarray
    preview: bytes  # JPEG of `image` with `box` drawn

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def to_json(self) -> dict[str, Any]:
        box = [self.box.x1, self.box.y1, self.box.x2, self.box.y2]
        return {"id": self.id, "width": self.width, "height": self.height, "face": {"box": box}}


def decode_photo(source: bytes | IO[bytes], max_pixels: int) -> np.ndarray:
    """The photo as BGR uint8, upright as its EXIF says, transparency flattened onto white."""
    try:
        with Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source, formats=PIL_FORMATS
        ) as photo:
            width, height = photo.size  # from the header; nothing is decoded yet
            if width * height > max_pixels:
                raise _too_many_pixels(f"{width}x{height} pixels", max_pixels)
            upright = ImageOps.exif_transpose(photo)
    except Image.DecompressionBombError as exc:  # Pillow's own, coarser limit
        raise _too_many_pixels(str(exc), max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, PhotoError):
            raise
        raise PhotoError(
            "not_an_image",
            f"cannot read the upload as a JPEG, PNG or WebP image ({exc}); send a photo file",
        ) from None
    if upright.has_transparency_data:
        white = Image.new("RGBA", upright.size, "white")
        upright = Image.alpha_composite(white, upright.convert("RGBA"))
    return cv2.cvtColor(np.asarray(upright.convert("RGB")), cv2.COLOR_RGB2BGR)


def _too_many_pixels(size: str, max_pixels: int) -> PhotoError:
    return PhotoError(
        "too_many_pixels",
        f"the photo is too large ({size}); at most {max_pixels / 1e6:g} megapixels are "
        "allowed: scale it down first",
    )


def fit_video(image: np.ndarray, max_width: int, max_height: int) -> np.ndarray:
    """`image` scaled down (never up) to fit max_width x max_height, keeping its aspect, with
    even dimensions as video encoders need (an odd last row or column of an unscaled photo is
    cropped rather than resampling the whole photo)."""
    height, width = image.shape[:2]
    scale = min(1.0, max_width / width, max_height / height)
    out_width, out_height = round(width * scale) // 2 * 2, round(height * scale) // 2 * 2
    if min(out_width, out_height) < MIN_SIDE:
        raise PhotoError(
            "image_too_small",
            f"the photo would be {out_width}x{out_height} pixels as video; use one at least "
            f"{MIN_SIDE} pixels on each side after fitting into {max_width}x{max_height}",
        )
    if scale == 1.0:
        return image[:out_height, :out_width]
    return cv2.resize(image, (out_width, out_height), interpolation=cv2.INTER_AREA)


def preview_jpeg(image: np.ndarray, box: FaceBox) -> bytes:
    """The video frame with the face box drawn, for the user to check what will be animated."""
    framed = image.copy()
    thickness = max(2, round(max(image.shape[:2]) / 400))
    cv2.rectangle(framed, (box.x1, box.y1), (box.x2 - 1, box.y2 - 1), (0, 255, 0), thickness)
    ok, encoded = cv2.imencode(".jpg", framed, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode the preview JPEG")
    return bytes(encoded.tobytes())


def make_avatar(
    avatar_id: str, source: bytes | IO[bytes], limits: PhotoLimits, find: FaceFinder
) -> Avatar:
    """Decode, fit and analyse a photo. Blocking: call it on a worker thread."""
    image = decode_photo(source, limits.max_pixels)
    image = np.ascontiguousarray(fit_video(image, limits.video_max_width, limits.video_max_height))
    try:
        box = find(image)
    except NoFaceError:
        raise PhotoError(
            "no_face",
            "no face found in the photo: use a well-lit photo of one person looking at the "
            "camera, with the face at least 80 pixels tall",
        ) from None
    face_input = model_input(image, box)
    image.flags.writeable = face_input.flags.writeable = False
    return Avatar(avatar_id, image, box, face_input, preview_jpeg(image, box))


class Avatars:
    """The avatars this worker has analysed, by content id, in memory.

    At most `limit` are kept (about 3 MB each at 720p); one more drops the least recently
    used, where analysing one and looking it up count as use. A session holds its own
    reference to its Avatar, so dropping one never disturbs a running session. The default
    avatar is not counted and never dropped.

    Photos are processed one at a time on a dedicated thread: the face detectors are shared
    and not known to be thread-safe, one decoded 40 MP photo alone takes 120 MB, and a burst of
    uploads should queue rather than take every core from the sessions' rendering.
    """

    def __init__(self, limits: PhotoLimits, limit: int, weights_cache: Path | None) -> None:
        self._limits = limits
        self._limit = limit
        self._weights_cache = weights_cache
        self._avatars: OrderedDict[str, Avatar] = OrderedDict()
        self._default: Avatar | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avatars")
        self._find: FaceFinder | None = None

    async def start(self) -> None:
        """Choose the face detector (S3FD if its weights are cached, else dlib) and prepare
        the default avatar, which also loads the detector before the first upload."""
        loop = asyncio.get_running_loop()
        s3fd = await loop.run_in_executor(
            self._executor, find_cached, DETECTOR, self._weights_cache
        )
        self._find = functools.partial(find_face, s3fd_path=s3fd)
        self._default = await self._make(DEFAULT_ID, _default_photo())
        log.info("face detection with %s; default avatar ready", "S3FD" if s3fd else "dlib")

    async def analyse(self, avatar_id: str, source: bytes | IO[bytes]) -> Avatar:
        """The avatar of a photo, analysed now unless it already was; PhotoError if the photo
        is unusable."""
        known = self.get(avatar_id)
        if known is not None:
            return known
        avatar = await self._make(avatar_id, source)
        self._avatars[avatar.id] = avatar
        while len(self._avatars) > self._limit:
            dropped, _ = self._avatars.popitem(last=False)
            log.info("dropped avatar %s, the least recently used", dropped)
        return avatar

    def get(self, avatar_id: str) -> Avatar | None:
        """The avatar, marked as just used, or None if unknown or dropped."""
        if avatar_id == DEFAULT_ID:
            return self._default
        avatar = self._avatars.get(avatar_id)
        if avatar is not None:
            self._avatars.move_to_end(avatar_id)
        return avatar

    def __len__(self) -> int:
        return len(self._avatars) + (self._default is not None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _make(self, avatar_id: str, source: bytes | IO[bytes]) -> Avatar:
        if self._find is None:
            raise RuntimeError("Avatars.start() has not run")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, make_avatar, avatar_id, source, self._limits, self._find
        )


def _default_photo() -> bytes:
    """scikit-image's public-domain astronaut portrait, read from the installed package."""
    return (importlib.resources.files("skimage.data") / "astronaut.png").read_bytes()
