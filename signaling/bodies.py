"""Reading request bodies from clients that may be slow, huge, or malformed.

A body is refused from its Content-Length before a byte of it is read, counted as it arrives
(a chunked body has no length to check), and must arrive whole within a deadline, so a client
trickling bytes cannot hold a request open. JSON must be labelled as JSON and be UTF-8; any
failure is a 4xx error with a message, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from typing import IO, Any

from aiohttp import web

from signaling.errors import ApiError

# Session offers are a few kilobytes of SDP; nothing the JSON API takes comes near this.
JSON_LIMIT = 128 * 1024
CHUNK = 64 * 1024


def too_large(what: str, limit: int) -> ApiError:
    size = f"{limit / 2**20:g} MB" if limit >= 2**20 else f"{limit / 1024:g} KB"
    return ApiError(413, "too_large", f"{what} is larger than the {size} allowed")


@contextlib.asynccontextmanager
async def deadline(timeout: float) -> AsyncIterator[None]:
    """408 unless the body read inside arrives within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise ApiError(
            408, "timeout", f"the request body did not arrive within {timeout:g} s"
        ) from None


async def receive(
    request: web.Request,
    sink: IO[bytes],
    limit: int,
    timeout: float,
    what: str = "the request body",
) -> None:
    """Copy the body into `sink`: 413 past `limit` bytes, 408 unless it all came in `timeout`
    seconds. A client that hangs up raises ConnectionResetError (logged by the errors
    middleware as the client's doing)."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(what, limit)
    size = 0
    async with deadline(timeout):
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                raise too_large(what, limit)
            sink.write(chunk)


async def read_json(request: web.Request, timeout: float, limit: int = JSON_LIMIT) -> Any:
    """The body as JSON: 415 unless labelled application/json, 400 unless it is UTF-8 JSON."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "unsupported_type",
            f"send JSON with Content-Type: application/json (this was {request.content_type!r})",
        )
    charset = request.charset
    if charset is not None and charset.lower().replace("-", "").replace("_", "") != "utf8":
        raise ApiError(400, "bad_charset", f"JSON must be UTF-8; charset={charset!r} is not")
    buffer = io.BytesIO()
    await receive(request, buffer, limit, timeout)
    try:
        return json.loads(buffer.getvalue().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_encoding", f"the body is not valid UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON ({exc})") from None


async def read_json_object(
    request: web.Request, timeout: float, shape: str, limit: int = JSON_LIMIT
) -> dict[str, Any]:
    """`read_json`, which must give an object; `shape` tells the client what belongs in it."""
    body = await read_json(request, timeout, limit)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", f"the body must be a JSON object: {shape}")
    return body
