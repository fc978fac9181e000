"""Session routes: an offer in, placed on a worker, its answer out; and ending a session.

The front door names each session, reserves a slot for it on the live worker with the most
headroom, and hands the offer over. The worker answers and runs the media; the browser's
WebRTC connection goes to the worker directly. A DELETE through any front door finds the
session's worker and ends it there.
"""

from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from signaling.avatars import AVATARS, DEFAULT_ID
from signaling.bodies import read_json_object
from signaling.cluster import (
    AvatarNeeded,
    Cluster,
    SessionSpec,
    WorkerUnavailable,
    summarize,
)
from signaling.config import CONFIG
from signaling.errors import ApiError
from signaling.metrics import METRICS

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 10
# A worker that cannot be reached is skipped, and the offer tried on the next.
PLACEMENT_TRIES = 3

CLUSTER = web.AppKey("cluster", Cluster)

routes = web.RouteTableDef()


OFFER_SHAPE = '{sdp, type: "offer", avatar?, input?: "microphone" or "push", sample_rate?}'
PUSH_RATES = (16_000, 24_000, 48_000)


async def _offer(request: web.Request) -> SessionSpec:
    """What the session is to be, from the request's JSON; 400 naming what is wrong."""
    timeout = request.app[CONFIG].request_timeout
    body = await read_json_object(request, timeout, OFFER_SHAPE)
    if not isinstance(body.get("sdp"), str) or not body["sdp"].strip():
        raise ApiError(400, "bad_offer", '"sdp" must be the offer\'s SDP text')
    if body.get("type") != "offer":
        raise ApiError(400, "bad_offer", '"type" must be "offer"')
    avatar = body.get("avatar", DEFAULT_ID)
    if not isinstance(avatar, str):
        raise ApiError(400, "bad_avatar", '"avatar" must be an avatar id string')
    pushed = body.get("input", "microphone")
    if pushed not in ("microphone", "push"):
        raise ApiError(400, "bad_input", '"input" must be "microphone" or "push"')
    rate = body.get("sample_rate", PUSH_RATES[0])
    if pushed == "push" and (type(rate) is not int or rate not in PUSH_RATES):
        raise ApiError(400, "bad_sample_rate", f'"sample_rate" must be one of {PUSH_RATES}')
    if pushed == "push":
        return SessionSpec(body["sdp"], avatar, "pusher", rate)
    return SessionSpec(body["sdp"], avatar)


@routes.post("/api/sessions")
async def create_session(request: web.Request) -> web.Response:
    session_id, answer = await start_session(request, await _offer(request))
    return web.json_response({"id": session_id, "sdp": answer, "type": "answer"}, status=201)


async def start_session(request: web.Request, spec: SessionSpec) -> tuple[str, str]:
    """A new session as `spec` says, placed on a worker: its id and the answer's SDP."""
    avatar_id = spec.avatar_id
    if await request.app[AVATARS].get(avatar_id) is None:
        raise ApiError(
            404, "avatar_not_found", f"no avatar {avatar_id!r}: upload it with POST /api/avatars"
        )
    metrics = request.app[METRICS]
    started = time.monotonic()
    try:
        placed = await place(request, spec)
    except ApiError as exc:
        metrics.sessions_refused.labels(exc.code).inc()
        raise
    metrics.placement_seconds.observe(time.monotonic() - started)
    metrics.sessions_started.inc()
    return placed


async def place(request: web.Request, spec: SessionSpec) -> tuple[str, str]:
    """Reserve a slot, hand the offer to its worker (with the photo if it lacks it); the
    session's id and the answer."""
    cluster, metrics = request.app[CLUSTER], request.app[METRICS]
    session_id = uuid.uuid4().hex
    for _ in range(PLACEMENT_TRIES):
        reserved = await cluster.reserve(session_id)
        if reserved is None:
            metrics.placements.labels("full").inc()
            raise await _nowhere(cluster)
        worker_id, worker = reserved
        try:
            try:
                answer = await worker.create_session(session_id, spec, None)
            except AvatarNeeded:
                photo = await request.app[AVATARS].store.photo(spec.avatar_id)
                if photo is None:
                    raise ApiError(
                        404, "avatar_not_found", f"no avatar {spec.avatar_id!r}: upload it again"
                    ) from None
                answer = await worker.create_session(session_id, spec, photo)
        except WorkerUnavailable as exc:
            log.warning("worker %s unreachable (%s); trying another", worker_id, exc)
            metrics.placements.labels("unreachable").inc()
            await cluster.release(session_id, worker_id)
            continue
        except ApiError as exc:
            metrics.placements.labels("refused").inc()
            await cluster.release(session_id, worker_id)
            if exc.code in ("server_full", "draining"):
                continue  # it filled up or began draining since it last reported: next one
            raise
        metrics.placements.labels("placed").inc()
        await cluster.placed(session_id, worker_id)
        log.info("session %s placed on worker %s", session_id, worker_id)
        return session_id, answer
    raise ApiError(
        503,
        "server_full",
        "no media worker could take the session; try again in a little while",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _nowhere(cluster: Cluster) -> ApiError:
    """Why no worker took the session: all full, or none serving (and why not)."""
    summary = summarize(await cluster.workers())
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if summary["status"] == "ok":
        return ApiError(
            503, "server_full", "every media worker is full; try again in a little while", retry
        )
    code = "degraded" if summary["workers"] else "no_workers"
    return ApiError(503, code, f"no media worker can take sessions: {summary['reason']}", retry)


@routes.delete("/api/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    await end_session(request, request.match_info["session_id"])
    return web.Response(status=204)


async def end_session(request: web.Request, session_id: str) -> None:
    """End a session on its worker; 404 if there is no such live session."""
    worker = await request.app[CLUSTER].locate(session_id)
    try:
        ended = worker is not None and await worker.end_session(session_id)
    except WorkerUnavailable:
        ended = False  # its worker is gone, and the session with it
    if not ended:
        raise ApiError(404, "session_not_found", f"no live session {session_id!r}")
