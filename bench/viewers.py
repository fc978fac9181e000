"""What each WHEP viewer of a session costs the server: its CPU with 0, 1, 2 and 4 viewers.

    python -m bench.viewers [--seconds 10] [--viewers 0 1 2 4]

A `lipsync serve --offline` process (the animator: inference is next to nothing, so what is
measured is the viewers' own work: VP8 encoding, RTP, SRTP), one caller streaming a tone in
another process, and the viewers in a third, so that the server's figure is its own. The
server's CPU is read from /proc over each window; results go to bench/results/viewers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.run import machine
from client.peer import LipSyncPeer, LipSyncViewer
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _caller(url: str, ready: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    async def run() -> None:
        t = np.arange(16000 * 600) / 16000
        tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(
            np.float32
        )
        async with aiohttp.ClientSession() as http:
            peer = LipSyncPeer(url, tone, receive_audio=False)
            await peer.connect(http)
            ready.put(peer.session_id)
            while not stop.is_set():
                await asyncio.sleep(0.2)
            await peer.close(http)

    asyncio.run(run())


def _viewers(url: str, session_id: str, count: int, seconds: float, out: multiprocessing.Queue):
    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            viewers = [LipSyncViewer(url, session_id) for _ in range(count)]
            for viewer in viewers:
                await viewer.connect(http)
            await asyncio.sleep(seconds + 4)
            out.put([len(v.received.video) for v in viewers])
            for viewer in viewers:
                await viewer.close(http)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--viewers", type=int, nargs="+", default=[0, 1, 2, 4])
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "signaling.cli", "serve", "--offline", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    context = multiprocessing.get_context("spawn")
    ready, out, stop = context.Queue(), context.Queue(), context.Event()
    rows = []
    try:
        time.sleep(10)
        caller = context.Process(target=_caller, args=(url, ready, stop))
        caller.start()
        session_id = ready.get(timeout=60)
        time.sleep(3)
        for count in args.viewers:
            group = None
            if count:
                group = context.Process(
                    target=_viewers, args=(url, session_id, count, args.seconds, out)
                )
                group.start()
                time.sleep(3)  # connected and streaming
            before, started = _cpu_seconds(server.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu = (_cpu_seconds(server.pid) - before) / (time.monotonic() - started) * 100
            frames = out.get(timeout=60) if group else []
            if group:
                group.join()
            rows.append({"viewers": count, "server_cpu_percent": round(cpu, 1),
                         "frames_per_viewer": frames})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            time.sleep(2)
        stop.set()
        caller.join()
    finally:
        server.terminate()
        server.wait()
    base = rows[0]["server_cpu_percent"]
    m = machine("cpu")
    lines = [
        f"Viewers of one session (the animator): {m['cpu']} ({m['cores']} cores), {m['date']}. "
        f"Reproduce: `python -m bench.viewers`.",
        "",
        "| viewers | server CPU | added per viewer | frames each viewer got |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        each = (row["server_cpu_percent"] - base) / row["viewers"] if row["viewers"] else 0
        frames = ", ".join(map(str, row["frames_per_viewer"])) or "-"
        lines.append(
            f"| {row['viewers']} | {row['server_cpu_percent']}% | "
            f"{'-' if not row['viewers'] else f'{each:.1f}%'} | {frames} |"
        )
    (RESULTS / "viewers.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "viewers.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
