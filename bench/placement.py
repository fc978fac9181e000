"""Placement at scale: many workers, several gateways, offers as fast as they come.

    python -m bench.placement [--workers 200] [--gateways 3] [--rates 100 200 400 800]

A real redis-server and real `lipsync gateway` processes; the workers are simulated (no media):
each registers with the real heartbeat (signaling/registry.py), answers placements at once with
a dummy answer, and ends each session a few seconds later by itself, as users hang up. A load
generator sends offers at each rate in turn for `--seconds`, spread over the gateways, and
records per rate: the offers answered, their status, the latency (p50, p99) at the client,
Redis operations per placed session (over what the heartbeats cost when idle), and the CPU
each kind of process used. Results go to bench/results/placement.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from bench.run import machine
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "placement-benchmark-cluster-secret"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SESSION_SECONDS = (0.5, 1.5)  # how long a simulated session lasts: 1 s on average
CAPACITY = 8
OFFER = {"sdp": "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "type": "offer"}


# -- simulated workers (run in their own processes: `--simulate`) ----------------------------


async def simulate(redis_url: str, port: int, first: int, count: int) -> None:
    """`count` workers behind one HTTP server at `port`, each under /w/{id}."""
    from signaling.registry import Heartbeat, connect

    redis = connect(redis_url)
    live: dict[str, set[str]] = {}
    beats: dict[str, Heartbeat] = {}
    endings: set[asyncio.Task[None]] = set()

    def status(worker_id: str) -> dict[str, Any]:
        sessions = live[worker_id]
        return {
            "id": worker_id, "url": f"http://127.0.0.1:{port}/w/{worker_id}",
            "engine": "animator", "device": "cpu", "state": "serving",
            "sessions": len(sessions), "max_sessions": CAPACITY, "capacity": CAPACITY,
            "headroom": CAPACITY - len(sessions), "device_fps": 1000.0, "min_fps": 20.0,
            "session_ids": sorted(sessions),
        }  # fmt: skip

    async def end_later(worker_id: str, session_id: str) -> None:
        await asyncio.sleep(random.uniform(*SESSION_SECONDS))
        live[worker_id].discard(session_id)
        beats[worker_id].poke()

    async def create(request: web.Request) -> web.Response:
        worker_id, session_id = request.match_info["worker"], request.match_info["session"]
        await request.read()
        if len(live[worker_id]) >= CAPACITY:
            return web.json_response({"error": {"code": "server_full", "message": "full"}}, 503)
        live[worker_id].add(session_id)
        beats[worker_id].poke()
        ending = asyncio.create_task(end_later(worker_id, session_id))
        endings.add(ending)
        ending.add_done_callback(endings.discard)
        return web.json_response({"sdp": "v=0 simulated"}, status=201)

    async def end(request: web.Request) -> web.Response:
        worker_id, session_id = request.match_info["worker"], request.match_info["session"]
        if session_id not in live[worker_id]:
            return web.json_response({"error": {"code": "session_not_found", "message": ""}}, 404)
        live[worker_id].discard(session_id)
        beats[worker_id].poke()
        return web.Response(status=204)

    async def describe(request: web.Request) -> web.Response:
        info = {"id": "default", "width": 512, "height": 512, "face": {"box": [0, 0, 1, 1]}}
        return web.json_response({**info, "preview": "/9j/2Q=="})

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response(status(request.match_info["worker"]))

    app = web.Application()
    app.router.add_put("/w/{worker}/internal/sessions/{session}", create)
    app.router.add_delete("/w/{worker}/internal/sessions/{session}", end)
    app.router.add_get("/w/{worker}/internal/avatars/default", describe)
    app.router.add_get("/w/{worker}/internal/status", get_status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    for i in range(first, first + count):
        worker_id = f"sim-{i:03d}"
        live[worker_id] = set()
        beats[worker_id] = Heartbeat(redis, worker_id, lambda w=worker_id: status(w))
        await beats[worker_id].start()
        await asyncio.sleep(1.0 / count)  # spread the heartbeats over the second
    print("simulating", flush=True)
    await asyncio.Event().wait()


# -- the run -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def redis_commands(port: int) -> int:
    info = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "stats"], capture_output=True, text=True
    ).stdout
    for line in info.splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    raise RuntimeError("no total_commands_processed in INFO")


async def offer_load(urls: list[str], rate: float, seconds: float) -> list[tuple[int, float]]:
    """Offers at `rate` a second for `seconds`, round-robin over `urls`: (status, latency)."""
    results: list[tuple[int, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(url: str) -> None:
            started = time.monotonic()
            try:
                async with http.post(f"{url}/api/sessions", json=OFFER) as response:
                    await response.read()
                    results.append((response.status, time.monotonic() - started))
            except aiohttp.ClientError:
                results.append((0, time.monotonic() - started))

        tasks = []
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
        await asyncio.gather(*tasks)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=200)
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--simulators", type=int, default=4, help="processes simulating workers")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--simulate", nargs=4, metavar=("REDIS", "PORT", "FIRST", "COUNT"))
    args = parser.parse_args()
    if args.simulate:
        redis_url, port, first, count = args.simulate
        asyncio.run(simulate(redis_url, int(port), int(first), int(count)))
        return

    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    processes: dict[str, list[subprocess.Popen[bytes]]] = {"redis": [], "gateways": [],
                                                           "simulators": []}  # fmt: skip
    env = {**os.environ, "LIPSYNC_CLUSTER_SECRET": SECRET}
    log = open(RESULTS / "placement-processes.log", "wb")  # noqa: SIM115
    try:
        processes["redis"].append(subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        ))  # fmt: skip
        time.sleep(0.5)
        per = args.workers // args.simulators
        for i in range(args.simulators):
            processes["simulators"].append(subprocess.Popen(
                [sys.executable, "-m", "bench.placement", "--simulate", redis_url,
                 str(free_port()), str(i * per), str(per)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
            ))  # fmt: skip
        urls = []
        for _ in range(args.gateways):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            processes["gateways"].append(subprocess.Popen(
                [sys.executable, "-m", "signaling.cli", "gateway", "--redis", redis_url,
                 "--port", str(port)],
                cwd=ROOT, env=env, stdout=log, stderr=log,
            ))  # fmt: skip
        for simulator in processes["simulators"]:
            assert simulator.stdout is not None
            assert simulator.stdout.readline() == b"simulating\n"
        found = asyncio.run(_measure(args, urls, redis_port, processes))
    finally:
        for group in processes.values():
            for process in group:
                process.kill()
                process.wait()
        log.close()
    found["machine"] = machine("cpu")
    (RESULTS / "placement.json").write_text(json.dumps(found, indent=2) + "\n")
    (RESULTS / "placement.md").write_text(report(found))
    print(report(found))


async def _measure(
    args: argparse.Namespace,
    urls: list[str],
    redis_port: int,
    processes: dict[str, list[subprocess.Popen[bytes]]],
) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        for url in urls:  # every gateway sees every worker
            while True:
                try:
                    async with http.get(f"{url}/api/health") as response:
                        if len((await response.json()).get("workers", [])) == args.workers:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
    idle_start, idle_commands = time.monotonic(), redis_commands(redis_port)
    await asyncio.sleep(5.0)
    idle_rate = (redis_commands(redis_port) - idle_commands) / (time.monotonic() - idle_start)
    runs = []
    for rate in args.rates:
        cpu_before = {k: sum(cpu_seconds(p.pid) for p in g) for k, g in processes.items()}
        own_before = time.process_time()
        commands_before, started = redis_commands(redis_port), time.monotonic()
        results = await offer_load(urls, rate, args.seconds)
        elapsed = time.monotonic() - started
        commands = redis_commands(redis_port) - commands_before - idle_rate * elapsed
        cpu = {k: (sum(cpu_seconds(p.pid) for p in g) - cpu_before[k]) / elapsed
               for k, g in processes.items()}  # fmt: skip
        cpu["load generator"] = (time.process_time() - own_before) / elapsed
        placed = [latency for status, latency in results if status == 201]
        latencies = [latency for _, latency in results]
        runs.append({
            "rate": rate, "seconds": round(elapsed, 1), "offers": len(results),
            "answered_per_s": round(len(results) / elapsed, 1),
            "statuses": {str(s): sum(1 for r in results if r[0] == s)
                         for s in sorted({r[0] for r in results})},
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
            "placed": len(placed),
            "redis_ops_per_session": round(commands / max(1, len(placed)), 1),
            "cpu_cores": {k: round(v, 2) for k, v in cpu.items()},
        })  # fmt: skip
        print(json.dumps(runs[-1]), flush=True)
        await asyncio.sleep(SESSION_SECONDS[1] + 1)  # the sessions end before the next rate
    return {
        "workers": args.workers, "gateways": args.gateways, "capacity_each": CAPACITY,
        "idle_redis_ops_per_s": round(idle_rate, 1), "runs": runs,
    }  # fmt: skip


def report(found: dict[str, Any]) -> str:
    m = found["machine"]
    lines = [
        f"Placement: {found['workers']} simulated workers ({found['capacity_each']} slots "
        f"each), {found['gateways']} gateways, one Redis; {m['cpu']} ({m['cores']} cores), "
        f"{m['date']}. Heartbeats alone: {found['idle_redis_ops_per_s']} Redis ops/s.",
        "",
        "| offered/s | answered/s | 201 / 503 / other | p50 ms | p99 ms | Redis ops per session "
        "| CPU cores: gateways / Redis / simulated workers / load generator |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in found["runs"]:
        statuses = run["statuses"]
        other = sum(n for s, n in statuses.items() if s not in ("201", "503"))
        cpu = run["cpu_cores"]
        lines.append(
            f"| {run['rate']:g} | {run['answered_per_s']} | {statuses.get('201', 0)} / "
            f"{statuses.get('503', 0)} / {other} | {run['p50_ms']} | {run['p99_ms']} | "
            f"{run['redis_ops_per_session']} | {cpu['gateways']} / {cpu['redis']} / "
            f"{cpu['simulators']} / {cpu['load generator']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
