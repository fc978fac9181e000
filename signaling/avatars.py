"""Avatars: the photos that sessions animate, checked, fitted to the video size and analysed once.

A photo is untrusted input. Its type is decided by its bytes (Pillow, limited to JPEG, PNG and
WebP), never by the label the client put on it; its pixel count is read from the header and
refused above a limit before anything is decoded, so a small file claiming huge dimensions (a
decompression bomb) costs nothing. Decoding and face detection take up to a second, so they run
on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import io
import logging
import secrets
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, cast

import cv2
import numpy as np
from aiohttp import web
from PIL import Image, ImageOps

from signaling.bodies import deadline, receive, too_large
from signaling.config import CONFIG, ServerConfig
from signaling.errors import ApiError
from wav2lip.faces import FaceBox, NoFaceError, find_face, model_input
from wav2lip.weights import DETECTOR, find_cached

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
# Below this the face would be a few pixels tall: nothing worth animating.
MIN_SIDE = 64
# Room for the boundaries and part headers of a multipart form around the photo itself.
MULTIPART_OVERHEAD = 64 * 1024
# The part of an upload kept in memory while it waits to be decoded; the rest is on disk.
SPOOL_BYTES = 1024 * 1024
# How long an upload waits for one of the `max_concurrent_uploads` slots before a 503.
UPLOAD_WAIT = 5.0

OCTET_STREAM = "application/octet-stream"

FaceFinder = Callable[[np.ndarray], FaceBox]

routes = web.RouteTableDef()


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
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

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
        raise ApiError(
            415,
            "not_an_image",
            f"cannot read the upload as a JPEG, PNG or WebP image ({exc}); send a photo file",
        ) from None
    if upright.has_transparency_data:
        white = Image.new("RGBA", upright.size, "white")
        upright = Image.alpha_composite(white, upright.convert("RGBA"))
    return cv2.cvtColor(np.asarray(upright.convert("RGB")), cv2.COLOR_RGB2BGR)


def _too_many_pixels(size: str, max_pixels: int) -> ApiError:
    return ApiError(
        400,
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
        raise ApiError(
            422,
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
    return encoded.tobytes()


def make_avatar(
    avatar_id: str, source: bytes | IO[bytes], config: ServerConfig, find: FaceFinder
) -> Avatar:
    """Decode, fit and analyse a photo. Blocking: call it on a worker thread."""
    image = decode_photo(source, config.max_pixels)
    image = np.ascontiguousarray(fit_video(image, config.video_max_width, config.video_max_height))
    try:
        box = find(image)
    except NoFaceError:
        raise ApiError(
            422,
            "no_face",
            "no face found in the photo: use a well-lit photo of one person looking at the "
            "camera, with the face at least 80 pixels tall",
        ) from None
    face_input = model_input(image, box)
    image.flags.writeable = face_input.flags.writeable = False
    return Avatar(avatar_id, image, box, face_input, preview_jpeg(image, box))


class AvatarStore:
    """The avatars this server knows, in memory.

    At most `config.avatar_limit` uploaded avatars are kept (about 3 MB each at 720p); adding
    one more drops the least recently used, where creating one and looking it up (to preview
    it or start a session) count as use. Memory stays bounded however many photos are
    uploaded, while avatars people are using stay. A session holds its own reference to its
    Avatar, so dropping one never disturbs a running session; only a new session or preview
    of it needs the photo uploaded again. The default avatar is not counted and never dropped.

    Photos are processed one at a time on a dedicated thread: the face detectors are shared
    and not known to be thread-safe, one decoded 40 MP photo alone takes 120 MB, and a burst of
    uploads should queue rather than take every core from the sessions' rendering. Uploads
    in flight, received or waiting for that thread, are bounded too (`upload_slot`): thirty
    concurrent 9 MB uploads once took the server from 0.5 to 1.24 GB.
    """

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._avatars: OrderedDict[str, Avatar] = OrderedDict()
        self._default: Avatar | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="avatars")
        self._find: FaceFinder | None = None
        self._uploads = asyncio.Semaphore(config.max_concurrent_uploads)

    @contextlib.asynccontextmanager
    async def upload_slot(self) -> AsyncIterator[None]:
        """One of the `max_concurrent_uploads` slots, waited for UPLOAD_WAIT seconds at most;
        503 with Retry-After if none comes free."""
        try:
            async with asyncio.timeout(UPLOAD_WAIT):
                await self._uploads.acquire()
        except TimeoutError:
            raise ApiError(
                503,
                "busy",
                "the server is processing other photos; try again in a few seconds",
                headers={"Retry-After": str(round(UPLOAD_WAIT))},
            ) from None
        try:
            yield
        finally:
            self._uploads.release()

    async def start(self) -> None:
        """Choose the face detector (S3FD if its weights are cached, else dlib) and prepare
        the default avatar, which also loads the detector before the first upload."""
        loop = asyncio.get_running_loop()
        s3fd = await loop.run_in_executor(self._executor, find_cached, DETECTOR, self._config.cache)
        self._find = functools.partial(find_face, s3fd_path=s3fd)
        self._default = await self._make(DEFAULT_ID, _default_photo())
        log.info("face detection with %s; default avatar ready", "S3FD" if s3fd else "dlib")

    async def create(self, source: bytes | IO[bytes]) -> Avatar:
        """A new avatar from an uploaded photo; raises ApiError when the photo is unusable."""
        avatar = await self._make(secrets.token_urlsafe(9), source)
        self._avatars[avatar.id] = avatar
        while len(self._avatars) > self._config.avatar_limit:
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
            raise RuntimeError("AvatarStore.start() has not run")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, make_avatar, avatar_id, source, self._config, self._find
        )


def _default_photo() -> bytes:
    """scikit-image's public-domain astronaut portrait, read from the installed package."""
    return (importlib.resources.files("skimage.data") / "astronaut.png").read_bytes()


# The application's avatars, for handlers: `request.app[AVATARS]`.
AVATARS = web.AppKey("avatars", AvatarStore)


def _lookup(request: web.Request) -> Avatar:
    avatar_id = request.match_info["avatar_id"]
    avatar = request.app[AVATARS].get(avatar_id)
    if avatar is None:
        raise ApiError(
            404,
            "avatar_not_found",
            f"no avatar {avatar_id!r}: upload the photo again with POST /api/avatars "
            "(avatars live in memory: a restart or many newer uploads drop them)",
        )
    return avatar


async def _read_upload(
    request: web.Request, spool: IO[bytes], limit: int, timeout: float
) -> IO[bytes]:
    """The photo from the raw body (written to `spool`, which is returned) or the form field
    `image`, reading at most about `limit` bytes: a declared larger body is refused unread, an
    undeclared one when it passes it."""
    multipart = request.content_type == "multipart/form-data"
    # Files with no known type come as application/octet-stream; the bytes decide anyway.
    if not multipart and request.content_type not in (*IMAGE_TYPES, OCTET_STREAM):
        raise ApiError(
            415,
            "unsupported_type",
            f"Content-Type {request.content_type!r} is not accepted: send the photo as the body "
            f"with Content-Type {', '.join(IMAGE_TYPES)}, or as the field 'image' of a "
            "multipart/form-data form",
        )
    if not multipart:
        await receive(request, spool, limit, timeout, "the photo")
        spool.seek(0)
        return spool
    max_size = limit + MULTIPART_OVERHEAD
    if request.content_length is not None and request.content_length > max_size:
        raise too_large("the photo", limit)
    # aiohttp writes a form's file fields to temporary files as they arrive.
    bounded = request.clone(client_max_size=max_size)
    try:
        async with deadline(timeout):
            field = (await bounded.post()).get("image")
    except web.HTTPRequestEntityTooLarge:
        raise too_large("the photo", limit) from None
    except ValueError as exc:
        raise ApiError(400, "bad_form", f"malformed multipart/form-data body ({exc})") from None
    if isinstance(field, web.FileField):
        return field.file
    if isinstance(field, bytes | bytearray):
        return io.BytesIO(field)
    raise ApiError(
        400 if field is None else 415,
        "missing_image" if field is None else "not_an_image",
        "the form needs the photo file in its field 'image'",
    )


@routes.post("/api/avatars")
async def create_avatar(request: web.Request) -> web.Response:
    config, store = request.app[CONFIG], request.app[AVATARS]
    # Past SPOOL_BYTES a photo waits for its decoding in a temporary file, not in memory.
    async with store.upload_slot():
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            source = await _read_upload(
                request, cast(IO[bytes], spool), config.max_upload_bytes, config.request_timeout
            )
            try:
                avatar = await store.create(source)
            finally:
                source.close()
    log.info("avatar %s: %dx%d, face %s", avatar.id, avatar.width, avatar.height, avatar.box)
    return web.json_response(
        avatar.to_json(), status=201, headers={"Location": f"/api/avatars/{avatar.id}"}
    )


@routes.get("/api/avatars/{avatar_id}")
async def get_avatar(request: web.Request) -> web.Response:
    return web.json_response(_lookup(request).to_json())


@routes.get("/api/avatars/{avatar_id}/preview")
async def get_preview(request: web.Request) -> web.Response:
    return web.Response(
        body=_lookup(request).preview,
        content_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600"},
    )
