"""Session routes: offer in, answer out; and ending a session."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from rtc_server.manager import BadOffer, MediaFailed, SessionManager, SessionsFull
from rtc_server.session import Photo
from signaling.avatars import AVATARS, DEFAULT_ID
from signaling.bodies import read_json_object
from signaling.config import CONFIG
from signaling.errors import ApiError

SESSIONS = web.AppKey("sessions", SessionManager)
RETRY_AFTER_SECONDS = 10

routes = web.RouteTableDef()


async def _offer(request: web.Request) -> dict[str, Any]:
    timeout = request.app[CONFIG].request_timeout
    body = await read_json_object(request, timeout, "{sdp, type, avatar?}")
    if not isinstance(body.get("sdp"), str) or not body["sdp"].strip():
        raise ApiError(400, "bad_offer", '"sdp" must be the offer\'s SDP text')
    if body.get("type") != "offer":
        raise ApiError(400, "bad_offer", '"type" must be "offer"')
    avatar = body.get("avatar", DEFAULT_ID)
    if not isinstance(avatar, str):
        raise ApiError(400, "bad_avatar", '"avatar" must be an avatar id string')
    return body


@routes.post("/api/sessions")
async def create_session(request: web.Request) -> web.Response:
    body = await _offer(request)
    avatar_id = body.get("avatar", DEFAULT_ID)
    avatar = request.app[AVATARS].get(avatar_id)
    if avatar is None:
        raise ApiError(
            404, "avatar_not_found", f"no avatar {avatar_id!r}: upload it with POST /api/avatars"
        )
    photo = Photo(avatar.image, avatar.box, avatar.face_input)
    try:
        session, answer = await request.app[SESSIONS].create(body["sdp"], photo)
    except (SessionsFull, MediaFailed) as exc:
        full = isinstance(exc, SessionsFull)
        raise ApiError(
            503,
            "server_full" if full else "degraded",
            f"{exc}; " + ("try again in a little while" if full else "the server will restart"),
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    except BadOffer as exc:
        raise ApiError(400, "bad_offer", str(exc)) from None
    return web.json_response({"id": session.id, "sdp": answer, "type": "answer"}, status=201)


@routes.delete("/api/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if not await request.app[SESSIONS].close(session_id):
        raise ApiError(404, "session_not_found", f"no live session {session_id!r}")
    return web.Response(status=204)


def install(app: web.Application, manager: SessionManager) -> None:
    """Give `app` the session manager and start and stop it with the app."""
    app[SESSIONS] = manager

    async def start(_: web.Application) -> None:
        await manager.start()

    async def stop(_: web.Application) -> None:
        await manager.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
