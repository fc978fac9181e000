"""Avatars at the front door: photos uploaded, stored once by their content, analysed by a worker.

A photo is untrusted input, and its checking (type by its bytes, pixel count before decoding,
the face) happens on a media worker, which has the face detector. The front door bounds what
reaches it: the upload's size, its time, and how many uploads are in flight
(`max_concurrent_uploads`; more wait briefly, then get 503), with each body waiting in a
temporary file past its first megabyte rather than in memory.

A photo's id is a hash of its bytes, so one photo is stored and analysed once however often it
is uploaded, and any front door or worker knows it by the same name. The store keeps the photo
(sent to a worker that has not analysed it yet), what the analysis found and the preview.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from aiohttp import web

from signaling.bodies import deadline, receive, too_large
from signaling.cluster import Analysis, Cluster
from signaling.config import CONFIG
from signaling.errors import ApiError

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
OCTET_STREAM = "application/octet-stream"
# Room for the boundaries and part headers of a multipart form around the photo itself.
MULTIPART_OVERHEAD = 64 * 1024
# The part of an upload kept in memory while it arrives; the rest is on disk.
SPOOL_BYTES = 1024 * 1024
# How long an upload waits for one of the `max_concurrent_uploads` slots before a 503.
UPLOAD_WAIT = 5.0
# How long a stored photo lasts without being used, and how many bytes of photos the
# in-memory store keeps.
PHOTO_TTL = 24 * 3600
MEMORY_PHOTO_BYTES = 256 * 1024 * 1024

routes = web.RouteTableDef()


def photo_id(photo: bytes) -> str:
    """A photo's name: a hash of its bytes (so any front door or worker gives the same)."""
    return hashlib.sha256(photo).hexdigest()[:32]


@dataclass(frozen=True)
class StoredAvatar:
    info: dict[str, Any]  # {"id", "width", "height", "face": {"box"}}
    preview: bytes


class PhotoStore(Protocol):
    """Where the front door keeps photos and what their analysis found."""

    async def get(self, avatar_id: str) -> StoredAvatar | None: ...

    async def photo(self, avatar_id: str) -> bytes | None: ...

    async def put(self, avatar_id: str, photo: bytes, analysis: Analysis) -> None: ...

    async def count(self) -> int: ...


class MemoryPhotos:
    """Photos in this process's memory: the most recently used, at most `limit` of them and
    `max_bytes` of photo bytes, each for at most `ttl` seconds without use."""

    def __init__(
        self, limit: int, max_bytes: int = MEMORY_PHOTO_BYTES, ttl: float = PHOTO_TTL
    ) -> None:
        self._limit, self._max_bytes, self._ttl = limit, max_bytes, ttl
        self._entries: OrderedDict[str, tuple[bytes, StoredAvatar, float]] = OrderedDict()

    def _fresh(self, avatar_id: str) -> tuple[bytes, StoredAvatar, float] | None:
        entry = self._entries.get(avatar_id)
        if entry is None:
            return None
        if entry[2] < time.monotonic():
            del self._entries[avatar_id]
            return None
        photo, stored, _ = entry
        self._entries[avatar_id] = (photo, stored, time.monotonic() + self._ttl)
        self._entries.move_to_end(avatar_id)
        return self._entries[avatar_id]

    async def get(self, avatar_id: str) -> StoredAvatar | None:
        entry = self._fresh(avatar_id)
        return entry[1] if entry is not None else None

    async def photo(self, avatar_id: str) -> bytes | None:
        entry = self._fresh(avatar_id)
        return entry[0] if entry is not None else None

    async def put(self, avatar_id: str, photo: bytes, analysis: Analysis) -> None:
        stored = StoredAvatar(analysis.info, analysis.preview)
        self._entries[avatar_id] = (photo, stored, time.monotonic() + self._ttl)
        self._entries.move_to_end(avatar_id)
        size = sum(len(entry[0]) for entry in self._entries.values())
        while len(self._entries) > self._limit or size > self._max_bytes:
            dropped, (photo_bytes, _, _) = self._entries.popitem(last=False)
            size -= len(photo_bytes)
            log.info("dropped avatar %s, the least recently used", dropped)

    async def count(self) -> int:
        return len(self._entries)


class Avatars:
    """The front door's avatars: the store, the upload slots, and the workers that analyse."""

    def __init__(self, store: PhotoStore, cluster: Cluster, max_uploads: int) -> None:
        self.store = store
        self._cluster = cluster
        self._uploads = asyncio.Semaphore(max_uploads)
        self._default: StoredAvatar | None = None

    @contextlib.asynccontextmanager
    async def upload_slot(self) -> AsyncIterator[None]:
        """One of the upload slots, waited for UPLOAD_WAIT seconds at most; 503 with
        Retry-After if none comes free."""
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

    async def create(self, photo: bytes) -> StoredAvatar:
        """The avatar of an uploaded photo: stored already, or analysed by a worker now."""
        avatar_id = photo_id(photo)
        known = await self.store.get(avatar_id)
        if known is not None:
            return known
        worker = await self._cluster.any_worker()
        if worker is None:
            raise _no_workers()
        analysis = await worker.analyse(avatar_id, photo)
        await self.store.put(avatar_id, photo, analysis)
        return StoredAvatar(analysis.info, analysis.preview)

    async def get(self, avatar_id: str) -> StoredAvatar | None:
        """A stored avatar, or the default one (as any worker describes it)."""
        if avatar_id != DEFAULT_ID:
            return await self.store.get(avatar_id)
        if self._default is None:
            worker = await self._cluster.any_worker()
            described = await worker.describe(DEFAULT_ID) if worker is not None else None
            if described is None:
                raise _no_workers()
            self._default = StoredAvatar(described.info, described.preview)
        return self._default


def _no_workers() -> ApiError:
    return ApiError(
        503, "no_workers", "no media worker is running; try again shortly", {"Retry-After": "5"}
    )


# The application's avatars, for handlers: `request.app[AVATARS]`.
AVATARS = web.AppKey("avatars", Avatars)


async def _lookup(request: web.Request) -> StoredAvatar:
    avatar_id = request.match_info["avatar_id"]
    avatar = await request.app[AVATARS].get(avatar_id)
    if avatar is None:
        raise ApiError(
            404,
            "avatar_not_found",
            f"no avatar {avatar_id!r}: upload the photo again with POST /api/avatars "
            "(unused photos expire, and the oldest are dropped when many more come)",
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
    config, avatars = request.app[CONFIG], request.app[AVATARS]
    async with avatars.upload_slot():
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            source = await _read_upload(
                request, cast(IO[bytes], spool), config.max_upload_bytes, config.request_timeout
            )
            with source:
                photo = source.read()
        avatar = await avatars.create(photo)
    info = avatar.info
    log.info("avatar %s: %dx%d, face %s", info["id"], info["width"], info["height"], info["face"])
    return web.json_response(info, status=201, headers={"Location": f"/api/avatars/{info['id']}"})


@routes.get("/api/avatars/{avatar_id}")
async def get_avatar(request: web.Request) -> web.Response:
    return web.json_response((await _lookup(request)).info)


@routes.get("/api/avatars/{avatar_id}/preview")
async def get_preview(request: web.Request) -> web.Response:
    return web.Response(
        body=(await _lookup(request)).preview,
        content_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600"},
    )
