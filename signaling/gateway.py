"""The front door alone: `lipsync gateway` (workers anywhere, found through Redis) and the front
door of `lipsync serve --workers N` (worker processes it starts on this machine).

Nothing here imports the media side: a front door starts in a second and stays small, and
never loads PyTorch or ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from signaling.app import create_app
from signaling.avatars import MemoryPhotos
from signaling.cluster import HttpWorker, LocalCluster, WorkerClient
from signaling.config import ServerConfig
from signaling.registry import RedisCluster, RedisPhotos, connect
from signaling.runner import run

log = logging.getLogger(__name__)

# How long `serve --workers` waits for its workers to warm up and listen.
WORKER_START_SECONDS = 300.0


async def serve_gateway(config: ServerConfig, redis_url: str, secret: str) -> int:
    """A front door placing sessions on the workers registered in Redis."""
    redis = connect(redis_url)
    await redis.ping()  # a wrong URL fails now, naming itself, not on the first offer
    app = create_app(config, RedisCluster(redis, secret), RedisPhotos(redis, config.avatar_limit))
    try:
        return await run(app, config, asyncio.Event())
    finally:
        await redis.aclose()


def gpu_count() -> int:
    """NVIDIA GPUs on this machine, as the driver lists them (without importing PyTorch)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def default_workers(device: str = "auto") -> int:
    """Workers for this machine: on a GPU, one per four cores (the CPU work of a session, RTP
    and encoding, is what one Python process runs out of), at least one per GPU; on a CPU
    alone (or with `device` "cpu"), one, which ONNX Runtime spreads over all cores."""
    gpus = 0 if device == "cpu" else gpu_count()
    if not gpus:
        return 1
    return max(gpus, (os.cpu_count() or 4) // 4)


def worker_devices(count: int, device: str) -> list[str]:
    """Each worker's device: spread over the GPUs (cuda:0, cuda:1, ...) when there are several
    and the device is left to choose; otherwise all on the one given."""
    gpus = gpu_count()
    if device in ("auto", "cuda") and gpus > 1:
        return [f"cuda:{i % gpus}" for i in range(count)]
    return [device] * count


async def serve_local_workers(
    config: ServerConfig,
    worker_commands: Sequence[list[str]],
    urls: Sequence[str],
    secret: str,
    env: dict[str, str],
) -> int:
    """Start the worker processes (`env` added to theirs), put a front door before them, and
    stop them with it. `worker_commands[i]` starts the worker reached at `urls[i]`; SIGTERM
    drains them all."""
    processes = [
        subprocess.Popen(command, env={**os.environ, **env}) for command in worker_commands
    ]
    try:
        async with aiohttp.ClientSession() as http:
            clients: list[WorkerClient] = [HttpWorker(url, secret, http) for url in urls]
            await _wait_for_workers(clients, processes)
            app = create_app(config, LocalCluster(clients), MemoryPhotos(config.avatar_limit))
            failed = asyncio.Event()
            watch = asyncio.create_task(_watch_workers(processes, failed))
            try:
                return await run(app, config, failed)
            finally:
                watch.cancel()
    finally:
        await asyncio.to_thread(_stop_workers, processes, config.shutdown_grace)


async def _wait_for_workers(
    clients: Sequence[WorkerClient], processes: Sequence[subprocess.Popen[bytes]]
) -> None:
    async def ready(client: WorkerClient) -> None:
        while True:
            with contextlib.suppress(Exception):
                await client.status()
                return
            if any(process.poll() is not None for process in processes):
                raise RuntimeError("a media worker exited while starting; see its log above")
            await asyncio.sleep(0.2)

    async with asyncio.timeout(WORKER_START_SECONDS):
        await asyncio.gather(*(ready(client) for client in clients))
    log.info("%d media workers ready", len(clients))


async def _watch_workers(
    processes: Sequence[subprocess.Popen[bytes]], failed: asyncio.Event
) -> None:
    """A worker that exits on its own (its engine failed) takes the front door down with a
    non-zero code, so that whatever supervises it restarts the whole."""
    while all(process.poll() is None for process in processes):
        await asyncio.sleep(0.5)
    log.error("a media worker exited (code %s)", [p.poll() for p in processes])
    failed.set()


def _stop_workers(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(grace + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def worker_command(args: Sequence[str]) -> list[str]:
    """The command that runs `lipsync worker` with `args`, with this Python."""
    return [sys.executable, "-m", "signaling.cli", "worker", *args]
