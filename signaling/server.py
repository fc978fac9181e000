"""Putting the media side to work: the one-process server, and a media worker process.

- `build_app` and `serve`: `lipsync serve`, the front door and one media worker in one process.
- `build_worker` and `serve_worker`: `lipsync worker`, a media worker's internal API, which
  registers itself in Redis when given one.

The front door alone (`lipsync gateway`, `serve --workers N`) is put together in
signaling/gateway.py, which never imports the media side.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from rtc_server.avatars import PhotoLimits
from rtc_server.engines import EngineChoice, check_delay, load_engine
from rtc_server.manager import SessionManager
from rtc_server.scheduler import EngineFailure
from rtc_server.worker import Worker, WorkerSettings
from signaling.app import create_app
from signaling.avatars import MemoryPhotos
from signaling.cluster import LocalCluster
from signaling.config import ServerConfig
from signaling.ice import rtc_configuration
from signaling.runner import run, warn_if_open
from signaling.worker_api import WORKER, InProcess, worker_app
from wav2lip.engine import MouthEngine

log = logging.getLogger(__name__)

# How often a draining worker looks whether its last session has ended.
DRAIN_POLL = 0.2
# The one-process server's sessions, for tests and tools that look inside.
SESSIONS = web.AppKey("sessions", SessionManager)


def engine_choice(config: ServerConfig) -> EngineChoice:
    return EngineChoice(
        checkpoint=config.checkpoint,
        cache=config.cache,
        offline=config.offline,
        device=config.device,
        backend=config.backend,
        threads=config.inference_threads,
        trust_checkpoint=config.trust_checkpoint,
    )


def worker_settings(config: ServerConfig, delay: float | None) -> WorkerSettings:
    return WorkerSettings(
        max_sessions=config.max_sessions,
        min_fps=config.min_fps,
        peer_timeout=config.peer_timeout,
        idle_timeout=config.session_idle_timeout,
        bitrate=config.video_bitrate,
        delay=delay,
        photo_limits=PhotoLimits(
            config.max_pixels, config.video_max_width, config.video_max_height
        ),
        avatar_limit=config.avatar_limit,
        weights_cache=config.cache,
        push_buffer=config.push_buffer,
        alignment=config.alignment,
        silence_db=config.silence_db,
        max_batch=config.max_batch,
    )


def make_worker(
    config: ServerConfig,
    engine: MouthEngine | None = None,
    delay: float | None = None,
    worker_id: str = "local",
) -> Worker:
    check_delay(delay, config.alignment)
    engine = engine if engine is not None else load_engine(engine_choice(config))
    return Worker(
        engine, worker_settings(config, delay), lambda: rtc_configuration(config), worker_id
    )


def build_app(
    config: ServerConfig, engine: MouthEngine | None = None, delay: float | None = None
) -> web.Application:
    """The one-process server: the front door with one media worker inside."""
    worker = make_worker(config, engine, delay, worker_id="local")
    app = create_app(
        config,
        LocalCluster([InProcess(worker)]),
        MemoryPhotos(config.avatar_limit),
        [worker.metrics.registry],
    )
    app[WORKER] = worker
    app[SESSIONS] = worker.manager

    async def start(_: web.Application) -> None:
        await worker.start()

    async def stop(_: web.Application) -> None:
        await worker.stop()

    app.on_startup.insert(0, start)  # warmed up before the front door first looks at it
    app.on_shutdown.append(stop)
    return app


def build_worker(
    config: ServerConfig,
    secret: str,
    engine: MouthEngine | None = None,
    delay: float | None = None,
    worker_id: str | None = None,
    advertise: str | None = None,
) -> web.Application:
    """A media worker process's application: its internal API, health and metrics."""
    worker = make_worker(
        config, engine, delay, worker_id or f"{socket.gethostname()}-{config.port}"
    )
    worker.url = advertise or f"http://{config.host}:{config.port}"
    return worker_app(worker, secret)


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


async def _freeze_heap(_: web.Application) -> None:
    """Exclude what start-up made (the model, the libraries' objects) from the garbage
    collector's full passes: with them, each pass held the GIL for 100-130 ms, and one comes
    when a session ends, stalling every other session's frames."""
    gc.collect()
    gc.freeze()


def serve(
    config: ServerConfig, delay: float | None = None, engine: MouthEngine | None = None
) -> int:
    """Run the one-process server until SIGTERM (exit code 0) or until its engine fails for
    good (1)."""
    warn_if_open(config)
    app = build_app(config, engine=engine, delay=delay)
    app.on_startup.append(_freeze_heap)  # last: after the avatars and sessions have started
    try:
        return asyncio.run(run(app, config, app[WORKER].failed, ssl_context(config)))
    except EngineFailure as exc:
        log.error("%s; exiting", exc)
        return 1


async def drain(worker: Worker, within: float) -> None:
    """Take no new session and let the live ones end by themselves, for `within` seconds at
    most; the rest are closed when the worker stops."""
    worker.drain()
    started = time.monotonic()
    log.info("draining: %d live sessions, at most %g s", len(worker.manager), within)
    while len(worker.manager) and time.monotonic() - started < within:
        await asyncio.sleep(DRAIN_POLL)


def serve_worker(
    app: web.Application, config: ServerConfig, redis_url: str | None, dead_after: float
) -> int:
    """Run a worker process until SIGTERM (it drains first: exit code 0) or until its engine
    fails for good (1); registered in Redis, if given one, once it accepts connections."""
    worker = app[WORKER]
    app.on_startup.append(_freeze_heap)
    listening = register(app, redis_url, dead_after) if redis_url else None
    try:
        return asyncio.run(
            run(
                app,
                config,
                worker.failed,
                before_stop=lambda within: drain(worker, within),
                listening=listening,
            )
        )
    except EngineFailure as exc:
        log.error("%s; exiting", exc)
        return 1


def register(
    app: web.Application, redis_url: str, dead_after: float
) -> Callable[[], Awaitable[None]]:
    """What registers the worker of `app` in Redis (to be awaited once it listens): a
    heartbeat every second, and at once when a session starts or ends; it leaves the registry
    when the app shuts down."""
    from signaling.registry import Heartbeat, connect

    worker = app[WORKER]
    redis = connect(redis_url)
    heartbeat = Heartbeat(redis, worker.id, worker.status, dead_after)

    async def start() -> None:
        await redis.ping()
        worker.manager.on_change = heartbeat.poke
        await heartbeat.start()
        log.info("registered as %s at %s", worker.id, worker.url)

    async def stop(_: web.Application) -> None:
        await heartbeat.stop()
        await redis.aclose()

    app.on_shutdown.insert(0, stop)
    return start
