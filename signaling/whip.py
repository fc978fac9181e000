"""WHIP ingest (RFC 9725) and WHEP egress: standard encoders feed sessions, players watch them.

- `POST /whip` or `/whip/{avatar}` (`application/sdp`): an offer that sends audio starts a
  session showing that avatar (the built-in photo by default). 201 with the answer,
  `Location: /whip/{id}`, and the ICE servers, fresh TURN logins included, as `Link` headers.
  `DELETE /whip/{id}` ends it. PATCH (trickle ICE, ICE restarts) is optional in WHIP and not
  offered: candidates come in the offer, so it gets 405, as every other verb does.
- `POST /whep/{id}` (`application/sdp`): a recvonly offer watches session {id} (from WHIP or
  from `/api/sessions`): its lip-synced video, and its audio if asked for. Its frames are made
  once for every receiver. 201 with the answer and `Location: /whep/{id}/{viewer}`, which
  DELETE stops.
- `GET /watch/{id}`: a page with just that video (an OBS browser source, or for others to
  watch someone's avatar), which plays it over WHEP.

With an API key, these take a bearer token, as WHIP specifies, like the rest of the API.
"""

from __future__ import annotations

import io
import secrets
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from signaling.avatars import DEFAULT_ID
from signaling.bodies import JSON_LIMIT, receive
from signaling.cluster import SessionSpec, WorkerUnavailable
from signaling.config import CONFIG
from signaling.errors import ApiError
from signaling.ice import ice_servers
from signaling.sessions import CLUSTER, end_session, start_session

SDP = "application/sdp"

routes = web.RouteTableDef()


async def _read_sdp(request: web.Request) -> str:
    """The offer: 415 unless labelled application/sdp, 400 unless UTF-8 text."""
    if request.content_type != SDP:
        raise ApiError(
            415,
            "unsupported_type",
            f"send the SDP offer with Content-Type: {SDP} (this was {request.content_type!r})",
        )
    buffer = io.BytesIO()
    await receive(request, buffer, JSON_LIMIT, request.app[CONFIG].request_timeout, "the offer")
    try:
        sdp = buffer.getvalue().decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", "the offer is not valid UTF-8") from None
    if not sdp.startswith("v=0"):
        raise ApiError(400, "bad_offer", "the body must be an SDP offer (starting with v=0)")
    return sdp


def _link(server: dict[str, Any]) -> list[str]:
    """RFC 9725's Link headers for one RTCIceServer dictionary, one per URL."""
    links = []
    for url in server["urls"]:
        link = f'<{url}>; rel="ice-server"'
        if "username" in server:
            link += (
                f'; username="{server["username"]}"; credential="{server["credential"]}"'
                '; credential-type="password"'
            )
        links.append(link)
    return links


def _answer(request: web.Request, answer: str, location: str) -> web.Response:
    headers = CIMultiDict({"Location": location, "Content-Type": SDP, "Cache-Control": "no-store"})
    for server in ice_servers(request.app[CONFIG]):
        for link in _link(server):
            headers.add("Link", link)
    return web.Response(status=201, body=answer.encode(), headers=headers)


async def _whip(request: web.Request, avatar_id: str) -> web.Response:
    sdp = await _read_sdp(request)
    session_id, answer = await start_session(request, SessionSpec(sdp, avatar_id, "ingest"))
    return _answer(request, answer, f"/whip/{session_id}")


@routes.post("/whip")
async def whip(request: web.Request) -> web.Response:
    return await _whip(request, DEFAULT_ID)


@routes.post("/whip/{name}")
async def whip_with_avatar(request: web.Request) -> web.Response:
    return await _whip(request, request.match_info["name"])


@routes.delete("/whip/{name}")
async def whip_end(request: web.Request) -> web.Response:
    await end_session(request, request.match_info["name"])
    return web.Response(status=200)


@routes.post("/whep/{session_id}")
async def whep(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    sdp = await _read_sdp(request)
    worker = await request.app[CLUSTER].locate(session_id)
    viewer_id = secrets.token_hex(8)
    try:
        answer = await worker.add_viewer(session_id, viewer_id, sdp) if worker else None
    except WorkerUnavailable:
        answer = None
    if answer is None:
        raise ApiError(404, "session_not_found", f"no live session {session_id!r} to watch")
    return _answer(request, answer, f"/whep/{session_id}/{viewer_id}")


@routes.delete("/whep/{session_id}/{viewer_id}")
async def whep_end(request: web.Request) -> web.Response:
    session_id, viewer_id = request.match_info["session_id"], request.match_info["viewer_id"]
    worker = await request.app[CLUSTER].locate(session_id)
    try:
        ended = worker is not None and await worker.end_viewer(session_id, viewer_id)
    except WorkerUnavailable:
        ended = False
    if not ended:
        raise ApiError(404, "viewer_not_found", "no such viewer of a live session")
    return web.Response(status=200)
