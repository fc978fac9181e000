"""The front door's aiohttp application: the page, health, ICE servers, avatars, tokens, sessions.

Each part keeps its routes in its own `web.RouteTableDef` and finds shared state on the app
through typed keys: `CONFIG`, `CLUSTER` (the media workers), `AVATARS` and `METRICS`.

Every request passes, in order: the guard (Host and Origin, CORS), the error middleware (any
failure becomes a JSON error), and, when the server has an API key, authentication.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from signaling import auth, avatars, sessions, whip
from signaling.avatars import AVATARS, Avatars, PhotoStore
from signaling.bodies import JSON_LIMIT
from signaling.cluster import Cluster, summarize
from signaling.config import CONFIG, ServerConfig
from signaling.errors import error_middleware
from signaling.guard import Guard
from signaling.ice import ice_servers
from signaling.metrics import CONTENT_TYPE, METRICS, FrontDoorMetrics
from signaling.sessions import CLUSTER

routes = web.RouteTableDef()
page_routes = web.RouteTableDef()


def create_app(
    config: ServerConfig,
    cluster: Cluster,
    photos: PhotoStore,
    metrics: Iterable[CollectorRegistry] = (),
) -> web.Application:
    """The application, not yet started: `signaling.runner.run` or aiohttp's test server
    start it (and with it the cluster's watch on its workers). `metrics` are registries
    served at /metrics beside the front door's own (a worker's, in one process)."""
    middlewares: list[Middleware] = [Guard(config).middleware, error_middleware]
    if config.api_key is not None:
        middlewares.append(auth.auth_middleware(config.api_key))
    # Bodies the handlers read whole are small; uploads raise this limit for themselves.
    app = web.Application(middlewares=middlewares, client_max_size=JSON_LIMIT)
    app[CONFIG] = config
    app[CLUSTER] = cluster
    app[AVATARS] = Avatars(photos, cluster, config.max_concurrent_uploads)
    app[METRICS] = FrontDoorMetrics(metrics)
    app.on_startup.append(_start_cluster)
    app.on_cleanup.append(_stop_cluster)
    tables = (routes, page_routes, avatars.routes, auth.routes, sessions.routes, whip.routes)
    for table in tables:
        app.add_routes(table)
    return app


async def _start_cluster(app: web.Application) -> None:
    await app[CLUSTER].start()


async def _stop_cluster(app: web.Application) -> None:
    await app[CLUSTER].stop()


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    """200 while sessions can be served, 503 with the reason when no worker can serve them:
    what a load balancer or an orchestrator's probe needs."""
    app = request.app
    config = app[CONFIG]
    summary = summarize(await app[CLUSTER].workers())
    return web.json_response(
        {
            **summary,
            "avatars": await app[AVATARS].store.count(),
            "auth": "key" if config.api_key else "open",
        },
        status=200 if summary["status"] == "ok" else 503,
        headers={"Cache-Control": "no-store"},
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    workers = await request.app[CLUSTER].workers()
    request.app[METRICS].count_workers(str(w["state"]) for w in workers)
    return web.Response(body=request.app[METRICS].text(), headers={"Content-Type": CONTENT_TYPE})


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


@page_routes.get("/watch/{session_id}")
async def watch(request: web.Request) -> web.FileResponse:
    """The page that plays one session's video over WHEP."""
    return _page_file("watch.html")


@page_routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.FileResponse:
    return _page_file(request.match_info["name"])
