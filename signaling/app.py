"""The aiohttp application: health, ICE servers, avatars, tokens, and where sessions plug in.

Each part keeps its routes in its own `web.RouteTableDef` and finds shared state on the app
through typed keys: `CONFIG`, `AVATARS` and `MEDIA_HEALTH`. The session part passes its routes
and its health to `create_app`, and adds its own startup and cleanup hooks to the app it returns.

Every request passes, in order: the guard (Host and Origin, CORS), the error middleware (any
failure becomes a JSON error), and, when the server has an API key, authentication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from aiortc.rtcicetransport import connection_kwargs

from signaling import auth, avatars
from signaling.avatars import AVATARS, AvatarStore
from signaling.bodies import JSON_LIMIT
from signaling.config import CONFIG, ServerConfig
from signaling.errors import error_middleware
from signaling.guard import Guard
from signaling.ice import ice_servers, rtc_configuration

# The media side's state for /api/health: {"status": "ok" or "degraded", "reason"?, "engine",
# "sessions", "max_sessions", "capacity", "headroom", ...}.
MediaHealth = Callable[[], dict[str, object]]
MEDIA_HEALTH = web.AppKey[MediaHealth]("media_health")

routes = web.RouteTableDef()
page_routes = web.RouteTableDef()


def _no_media() -> dict[str, object]:
    return {"status": "ok", "engine": None, "sessions": 0}


def create_app(
    config: ServerConfig,
    *,
    media_health: MediaHealth = _no_media,
    session_routes: Iterable[web.AbstractRouteDef] = (),
) -> web.Application:
    """The application, not yet started: `signaling.runner.run` or aiohttp's test server
    start it.

    `media_health` gives the media side's state whenever health is asked; `session_routes`
    (e.g. a RouteTableDef) are added beside the routes here and see the same checks.
    """
    middlewares: list[Middleware] = [Guard(config).middleware, error_middleware]
    if config.api_key is not None:
        middlewares.append(auth.auth_middleware(config.api_key))
    # Bodies the handlers read whole are small; uploads raise this limit for themselves.
    app = web.Application(middlewares=middlewares, client_max_size=JSON_LIMIT)
    app[CONFIG] = config
    app[MEDIA_HEALTH] = media_health
    app[AVATARS] = AvatarStore(config)
    app.on_startup.append(_start_avatars)
    app.on_cleanup.append(_close_avatars)
    app.add_routes(routes)
    app.add_routes(page_routes)
    app.add_routes(avatars.routes)
    app.add_routes(auth.routes)
    app.add_routes(session_routes)
    return app


async def _start_avatars(app: web.Application) -> None:
    await app[AVATARS].start()


async def _close_avatars(app: web.Application) -> None:
    app[AVATARS].close()


def _server_ice(config: ServerConfig) -> dict[str, str | None]:
    """The one STUN and one TURN server aiortc will really use, asked of aiortc itself."""
    used: dict[str, Any] = connection_kwargs(rtc_configuration(config).iceServers or [])
    turn = None
    if "turn_server" in used:
        host, port = used["turn_server"]
        scheme = "turns" if used["turn_ssl"] else "turn"
        turn = f"{scheme}:{host}:{port}?transport={used['turn_transport']}"
    stun = "stun:{}:{}".format(*used["stun_server"]) if "stun_server" in used else None
    return {"stun": stun, "turn": turn}


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    """200 while sessions can be served, 503 with the reason once the media side has failed:
    what a load balancer or an orchestrator's probe needs."""
    app = request.app
    config = app[CONFIG]
    media = app[MEDIA_HEALTH]()
    return web.json_response(
        {
            **media,
            "avatars": len(app[AVATARS]),
            "auth": "key" if config.api_key else "open",
            # aiortc uses only the first STUN and the first usable TURN URL; browsers use all.
            "server_ice": _server_ice(config),
        },
        status=200 if media["status"] == "ok" else 503,
        headers={"Cache-Control": "no-store"},
    )


@routes.get("/api/ice-servers")
async def get_ice_servers(request: web.Request) -> web.Response:
    servers = ice_servers(request.app[CONFIG])
    # Logins are minted per request and must not be served from a cache to someone else.
    return web.json_response({"iceServers": servers}, headers={"Cache-Control": "no-store"})


# -- the browser page -------------------------------------------------------------------------

# The page's files: the package data of `client`, which is installed beside this package (a
# wheel puts both in site-packages, an editable install leaves both in the checkout). Found by
# path, not by importing `client`: an editable install made before client/ had its __init__.py
# maps it as a namespace package, which importlib.resources cannot read.
CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"
PAGE_SUFFIXES = (".html", ".js", ".css")
# The page loads nothing from elsewhere, and the policy makes sure of it; media and images come
# from this server or from blob:/mediastream: objects the page makes itself.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated each time (a 304 when unchanged), so an upgraded server never runs old JS.
    "Cache-Control": "no-cache",
}


def _page_file(name: str) -> web.FileResponse:
    """A file of the page by its bare name; anything else, or a path, is a plain 404."""
    path = CLIENT_DIR / name
    if "/" in name or "\\" in name or path.suffix not in PAGE_SUFFIXES or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=PAGE_HEADERS)


@page_routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return _page_file("index.html")


@page_routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.FileResponse:
    return _page_file(request.match_info["name"])
