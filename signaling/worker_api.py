"""A media worker's HTTP side: the internal API the front door uses, its health and metrics.

Only worker processes and the one-process server import this module: it brings the media side,
and with it PyTorch. The front door reaches a worker over this API (`cluster.HttpWorker`), or,
in one process, through `InProcess`; both turn the worker's refusals into the same errors.

The internal API (`/internal/...`) needs the cluster's shared secret; health and metrics do not,
as load balancers and Prometheus ask for them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rtc_server.avatars import Avatar, PhotoError
from rtc_server.manager import MediaFailed, SessionsFull
from rtc_server.offers import CALLER, INGEST, PUSHER, BadOffer
from rtc_server.pushed import RATES as PUSH_RATES
from rtc_server.worker import AvatarNeeded, Worker
from signaling import cluster
from signaling.bodies import read_json_object, receive
from signaling.errors import ApiError, error_middleware

RETRY_AFTER_SECONDS = 10
# How a photo's refusal reads over HTTP.
PHOTO_STATUS = {"not_an_image": 415, "too_many_pixels": 400, "image_too_small": 422, "no_face": 422}
# A photo within the upload limit, base64 in a JSON offer.
INTERNAL_BODY_LIMIT = 16 * 1024 * 1024
INTERNAL_TIMEOUT = 30.0

WORKER = web.AppKey("worker", Worker)

routes = web.RouteTableDef()


def api_error(exc: Exception) -> ApiError:
    """The HTTP error for a refusal of the media side; other exceptions are re-raised."""
    if isinstance(exc, PhotoError):
        return ApiError(PHOTO_STATUS[exc.code], exc.code, str(exc))
    if isinstance(exc, SessionsFull):
        code = "draining" if exc.reason == "draining" else "server_full"
        return ApiError(
            503,
            code,
            f"{exc}; try again in a little while",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, MediaFailed):
        return ApiError(
            503,
            "degraded",
            f"{exc}; the server will restart",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, BadOffer):
        return ApiError(400, "bad_offer", str(exc))
    raise exc


def analysis(avatar: Avatar) -> cluster.Analysis:
    return cluster.Analysis(avatar.to_json(), avatar.preview)


class InProcess:
    """The front door's client for a worker in its own process: direct calls."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def status(self) -> dict[str, Any]:
        return self.worker.status()

    async def describe(self, avatar_id: str) -> cluster.Analysis | None:
        avatar = self.worker.avatars.get(avatar_id)
        return analysis(avatar) if avatar is not None else None

    async def analyse(self, avatar_id: str, photo: bytes) -> cluster.Analysis:
        try:
            return analysis(await self.worker.analyse(avatar_id, photo))
        except PhotoError as exc:
            raise api_error(exc) from None

    async def create_session(
        self, session_id: str, spec: cluster.SessionSpec, photo: bytes | None
    ) -> str:
        try:
            return await self.worker.create_session(
                session_id, spec.sdp, spec.avatar_id, photo, spec.kind, spec.push_rate
            )
        except AvatarNeeded:
            raise cluster.AvatarNeeded() from None
        except (PhotoError, SessionsFull, MediaFailed, BadOffer) as exc:
            raise api_error(exc) from None

    async def end_session(self, session_id: str) -> bool:
        return await self.worker.end_session(session_id)

    async def add_viewer(self, session_id: str, viewer_id: str, sdp: str) -> str | None:
        try:
            return await self.worker.add_viewer(session_id, viewer_id, sdp)
        except BadOffer as exc:
            raise api_error(exc) from None

    async def end_viewer(self, session_id: str, viewer_id: str) -> bool:
        return await self.worker.end_viewer(session_id, viewer_id)


def _secret_middleware(secret: str) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/internal/"):
            given = request.headers.get(hdrs.AUTHORIZATION, "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                raise ApiError(401, "unauthorized", "the internal API needs the cluster secret")
        return await handler(request)

    return check


def worker_app(worker: Worker, secret: str) -> web.Application:
    """The worker's HTTP application: start it and the worker starts (warm-up included)."""
    app = web.Application(
        middlewares=[error_middleware, _secret_middleware(secret)],
        client_max_size=INTERNAL_BODY_LIMIT,
    )
    app[WORKER] = worker
    app.add_routes(routes)

    async def start(_: web.Application) -> None:
        await worker.start()

    async def stop(_: web.Application) -> None:
        await worker.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


@routes.get("/internal/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[WORKER].status())


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    status = request.app[WORKER].status()
    del status["session_ids"]
    return web.json_response(status, status=200 if status["state"] != "degraded" else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[WORKER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _analysis_json(result: cluster.Analysis) -> dict[str, Any]:
    return {**result.info, "preview": base64.b64encode(result.preview).decode("ascii")}


@routes.get("/internal/avatars/{avatar_id}")
async def describe(request: web.Request) -> web.Response:
    result = await InProcess(request.app[WORKER]).describe(request.match_info["avatar_id"])
    if result is None:
        raise ApiError(404, "avatar_not_found", "this worker has not analysed that photo")
    return web.json_response(_analysis_json(result))


@routes.put("/internal/avatars/{avatar_id}")
async def analyse(request: web.Request) -> web.Response:
    photo = await _read_photo(request)
    result = await InProcess(request.app[WORKER]).analyse(request.match_info["avatar_id"], photo)
    return web.json_response(_analysis_json(result))


async def _read_photo(request: web.Request) -> bytes:
    buffer = io.BytesIO()
    await receive(request, buffer, INTERNAL_BODY_LIMIT, INTERNAL_TIMEOUT, "the photo")
    return buffer.getvalue()


@routes.put("/internal/sessions/{session_id}")
async def create_session(request: web.Request) -> web.Response:
    body = await read_json_object(
        request, INTERNAL_TIMEOUT, "{sdp, avatar, kind?, push_rate?, photo?}", INTERNAL_BODY_LIMIT
    )
    kind = body.get("kind", CALLER)
    if kind not in (CALLER, PUSHER, INGEST):
        raise ApiError(400, "bad_kind", f'"kind" must be "{CALLER}", "{PUSHER}" or "{INGEST}"')
    rate = body.get("push_rate")
    if kind == PUSHER and (type(rate) is not int or rate not in PUSH_RATES):
        raise ApiError(400, "bad_push_rate", f'"push_rate" must be one of {PUSH_RATES}')
    spec = cluster.SessionSpec(str(body["sdp"]), str(body["avatar"]), kind, rate)
    photo = None
    if "photo" in body:
        try:
            photo = base64.b64decode(body["photo"], validate=True)
        except (binascii.Error, TypeError):
            raise ApiError(400, "bad_photo", '"photo" must be base64') from None
    try:
        answer = await InProcess(request.app[WORKER]).create_session(
            request.match_info["session_id"], spec, photo
        )
    except cluster.AvatarNeeded:
        raise ApiError(409, "avatar_needed", "send the photo along") from None
    return web.json_response({"sdp": answer}, status=201)


@routes.delete("/internal/sessions/{session_id}")
async def end_session(request: web.Request) -> web.Response:
    if not await request.app[WORKER].end_session(request.match_info["session_id"]):
        raise ApiError(404, "session_not_found", "no such session on this worker")
    return web.Response(status=204)


@routes.put("/internal/sessions/{session_id}/viewers/{viewer_id}")
async def add_viewer(request: web.Request) -> web.Response:
    body = await read_json_object(request, INTERNAL_TIMEOUT, "{sdp}")
    answer = await InProcess(request.app[WORKER]).add_viewer(
        request.match_info["session_id"], request.match_info["viewer_id"], str(body["sdp"])
    )
    if answer is None:
        raise ApiError(404, "session_not_found", "no such session on this worker")
    return web.json_response({"sdp": answer}, status=201)


@routes.delete("/internal/sessions/{session_id}/viewers/{viewer_id}")
async def end_viewer(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    if not await worker.end_viewer(
        request.match_info["session_id"], request.match_info["viewer_id"]
    ):
        raise ApiError(404, "viewer_not_found", "no such viewer of that session")
    return web.Response(status=204)
