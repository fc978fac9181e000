"""The aiohttp application: health, ICE servers and avatars, and the place sessions plug in.

Each part keeps its routes in its own `web.RouteTableDef` and finds shared state on the app
through typed keys: `CONFIG`, `AVATARS`, `ENGINE_NAME` and `SESSION_COUNT`. The session part
passes its routes and a live session count to `create_app`, and adds its own startup and
cleanup hooks to the app it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from aiortc.rtcicetransport import connection_kwargs

from signaling import avatars
from signaling.avatars import AVATARS, AvatarStore
from signaling.config import CONFIG, ServerConfig
from signaling.errors import error_middleware
from signaling.ice import ice_servers, rtc_configuration

ENGINE_NAME = web.AppKey[str]("engine_name")
SESSION_COUNT = web.AppKey[Callable[[], int]]("session_count")

routes = web.RouteTableDef()


def create_app(
    config: ServerConfig,
    *,
    engine_name: str = "wav2lip",
    session_count: Callable[[], int] = lambda: 0,
    session_routes: Iterable[web.AbstractRouteDef] = (),
) -> web.Application:
    """The application, not yet started: `web.run_app(app)` or aiohttp's test server start it.

    `engine_name` is what renders the video, as health reports it; `session_count` returns the
    number of live sessions whenever health is asked; `session_routes` (e.g. a RouteTableDef)
    are added beside the routes here and see the same error handling.
    """
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app[ENGINE_NAME] = engine_name
    app[SESSION_COUNT] = session_count
    app[AVATARS] = AvatarStore(config)
    app.on_startup.append(_start_avatars)
    app.on_cleanup.append(_close_avatars)
    app.add_routes(routes)
    app.add_routes(avatars.routes)
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
    app = request.app
    config = app[CONFIG]
    return web.json_response(
        {
            "status": "ok",
            "engine": app[ENGINE_NAME],
            "sessions": app[SESSION_COUNT](),
            "max_sessions": config.max_sessions,
            "avatars": len(app[AVATARS]),
            # aiortc uses only the first STUN and the first usable TURN URL; browsers use all.
            "server_ice": _server_ice(config),
        }
    )


@routes.get("/api/ice-servers")
async def get_ice_servers(request: web.Request) -> web.Response:
    servers = ice_servers(request.app[CONFIG])
    # Logins are minted per request and must not be served from a cache to someone else.
    return web.json_response({"iceServers": servers}, headers={"Cache-Control": "no-store"})
