"""Putting the server together: pick the engine, make the session manager, build the app."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import ssl

from aiohttp import web

from rtc_server.manager import ManagerOptions, SessionManager
from rtc_server.scheduler import EngineFailure
from rtc_server.session import JITTER_SECONDS
from signaling.app import create_app
from signaling.config import ServerConfig
from signaling.ice import rtc_configuration
from signaling.runner import run
from signaling.sessions import SESSIONS, install
from signaling.sessions import routes as session_routes
from wav2lip.animator import Animator
from wav2lip.audio import LOOKAHEAD_SECONDS
from wav2lip.blend import first_face_row
from wav2lip.checkpoint import load_checkpoint
from wav2lip.engine import Engine, MouthEngine
from wav2lip.weights import GENERATORS, WeightsError, fetch, find_generator

log = logging.getLogger(__name__)

# Beyond the audio a frame needs and the network's jitter, the delay covers the render: a batch
# must fit in it. On a CPU (ONNX Runtime) a Wav2Lip frame takes about 30 ms and batching gains
# little, so frames go one at a time; a GPU gains from batching sessions together.
RENDER_BUDGET = {"animator": 0.06, "wav2lip-gpu": 0.02, "wav2lip": 0.07}
CPU_BATCH = 1
GPU_BATCH = 16


def load_engine(config: ServerConfig) -> MouthEngine:
    """Wav2Lip when weights can be had (explicit, cached, or fetched unless offline); the
    built-in animator otherwise, which needs no weights and says so in /api/health."""
    checkpoint = config.checkpoint or find_generator(config.cache)
    if checkpoint is None and not config.offline:
        try:
            checkpoint = fetch(GENERATORS[0], cache=config.cache)
        except WeightsError as exc:
            log.warning("could not fetch Wav2Lip weights (%s)", exc)
    if checkpoint is None:
        log.warning(
            "no Wav2Lip weights: running the built-in animator, which warps the photo's mouth "
            "with the loudness of speech; run `lipsync weights fetch` for real lip-sync"
        )
        return Animator()
    log.info("Wav2Lip weights: %s", checkpoint)
    # Sessions blend with the feathered mask: only the lower face is computed.
    return Engine(
        load_checkpoint(checkpoint, trust_code=config.trust_checkpoint),
        device=config.device,
        first_row=first_face_row("feather"),
    )


def _on_gpu(engine: MouthEngine) -> bool:
    """Wav2Lip on CUDA or Apple's MPS: batches are cheap there."""
    return isinstance(engine, Engine) and engine.device.type != "cpu"


def default_delay(engine: MouthEngine) -> float:
    """Seconds from a sound's arrival to the frame that shows it leaving the server."""
    key = f"{engine.name}-gpu" if _on_gpu(engine) else engine.name
    return LOOKAHEAD_SECONDS + JITTER_SECONDS + RENDER_BUDGET[key]


def build_app(
    config: ServerConfig, engine: MouthEngine | None = None, delay: float | None = None
) -> web.Application:
    least = LOOKAHEAD_SECONDS + JITTER_SECONDS
    if delay is not None and delay <= least:
        raise ValueError(
            f"--delay must be more than {least:.4f} s: Wav2Lip's mel window needs "
            f"{LOOKAHEAD_SECONDS} s of audio beyond each frame, plus {JITTER_SECONDS} s for jitter"
        )
    engine = engine if engine is not None else load_engine(config)
    manager = SessionManager(
        engine,
        ManagerOptions(
            max_sessions=config.max_sessions,
            delay=delay if delay is not None else default_delay(engine),
            idle_timeout=config.session_idle_timeout,
            bitrate=config.video_bitrate,
            max_batch=GPU_BATCH if _on_gpu(engine) else CPU_BATCH,
            peer_timeout=config.peer_timeout,
            min_fps=config.min_fps,
        ),
        lambda: rtc_configuration(config),
    )
    app = create_app(config, media_health=manager.health, session_routes=session_routes)
    install(app, manager)
    return app


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


def _beyond_loopback(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a wildcard ("") or a name: assume other machines can reach it


def serve(
    config: ServerConfig, delay: float | None = None, engine: MouthEngine | None = None
) -> int:
    """Run the server until SIGTERM (exit code 0) or until its engine fails for good (1)."""
    if _beyond_loopback(config.host) and config.api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach this address can start "
            "sessions and upload photos; set --api-key (or $LIPSYNC_API_KEY)",
            config.host,
        )
    app = build_app(config, engine=engine, delay=delay)
    app.on_startup.append(_freeze_heap)  # last: after the avatars and sessions have started
    try:
        return asyncio.run(run(app, config, app[SESSIONS].failed, ssl_context(config)))
    except EngineFailure as exc:
        log.error("%s; exiting", exc)
        return 1
