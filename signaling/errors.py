"""JSON errors for the API: one shape, `{"error": {"code", "message"}}`, for every failure.

Handlers raise `ApiError`; the middleware turns it, aiohttp's own HTTP errors on /api paths
(unknown path, wrong method, body too large) and any unexpected exception into that shape, so a
client never has to parse HTML or plain text, and a bug in one request never takes the server
down. Paths outside /api (the page and its assets) keep aiohttp's plain responses. A client that
hangs up mid-request is logged as such: that is the client's doing, not a server error.
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

log = logging.getLogger(__name__)


# Answers after which the rest of the request cannot be trusted to follow: the connection
# closes instead of reading (or waiting for) a body nobody wants.
CLOSING_STATUSES = frozenset({408, 413})
# Paths whose errors are JSON: the public API, WHIP and WHEP, and the workers' internal API.
JSON_PATHS = ("/api/", "/internal/", "/whip", "/whep")


class ApiError(Exception):
    """A failure to report to the client: HTTP status, a stable code and a message to act on,
    and any headers the client needs (Retry-After on a 503, say)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )
    if status in CLOSING_STATUSES:
        response.force_close()
    return response


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own error as JSON, keeping headers that matter (e.g. Allow on a 405)."""
    if isinstance(exc, web.HTTPNotFound):
        code, message = "not_found", f"no API endpoint at {request.path}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        code = "method_not_allowed"
        message = f"{exc.method} is not allowed on {request.path}; use {allowed}"
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        code, message = "too_large", "the request body is too large"
    else:
        code, message = exc.reason.lower().replace(" ", "_"), exc.text or exc.reason
    skip = {hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH}
    headers = {k: v for k, v in exc.headers.items() if k not in skip}
    return error_response(exc.status, code, message, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except ConnectionError:
        # aiohttp raises ConnectionResetError in a handler reading a body the client abandoned.
        log.info("client went away during %s %s", request.method, request.path)
        return web.Response(status=400, reason="Client Disconnected")
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith(JSON_PATHS):
            raise
        return _from_http_exception(request, exc)
    except Exception:
        if not request.path.startswith(JSON_PATHS):
            raise
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(
            500, "internal", "unexpected server error; the server log has the details"
        )
