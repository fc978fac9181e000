"""Scale-out: front doors (`lipsync gateway`) and media workers (`lipsync worker`) as real
processes, coordinating through a real redis-server on a free port, with real aiortc peers
streaming through them; and `lipsync serve --workers 2`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from prometheus_client.parser import text_string_to_metric_families

from client.peer import LipSyncPeer, LipSyncPusher, SpeechTrack
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

SECRET = "a cluster secret for the tests, 0123456789"
ENV = {**os.environ, "LIPSYNC_CLUSTER_SECRET": SECRET}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; scripts/test.sh installs it")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def _start(kind: str, folder: Path, name: str, *flags: str) -> Process:
    port = free_port()
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "signaling.cli", kind, "--host", "127.0.0.1",
             "--port", str(port), *flags],
            cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Process(popen, f"http://127.0.0.1:{port}", log)


def worker(folder: Path, redis_url: str, name: str, max_sessions: int = 2) -> Process:
    return _start("worker", folder, name, "--offline", "--redis", redis_url, "--worker-id", name,
                  "--max-sessions", str(max_sessions), "--min-fps", "0")  # fmt: skip


def gateway(folder: Path, redis_url: str, name: str) -> Process:
    return _start("gateway", folder, name, "--redis", redis_url)


async def health(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/health") as response:
        return dict(await response.json())


async def until(check, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def wait_workers(url: str, ids: set[str], timeout: float = 120) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        found: dict[str, Any] = {}

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                found.update(await health(http, url))
                return {w["id"] for w in found.get("workers", [])} == ids
            return False

        await until(ready, timeout, f"workers {ids} in {url}'s health")
        return found


def by_worker(status: dict[str, Any]) -> dict[str, int]:
    return {w["id"]: w["sessions"] for w in status["workers"]}


def _speech(seconds: float = 20.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two gateways and two workers (two sessions each) on one Redis."""
    folder = tmp_path_factory.mktemp("cluster")
    processes = {
        "w1": worker(folder, redis_url, "w1"),
        "w2": worker(folder, redis_url, "w2"),
        "a": gateway(folder, redis_url, "a"),
        "b": gateway(folder, redis_url, "b"),
    }
    try:
        for name in ("a", "b"):
            asyncio.run(wait_workers(processes[name].url, {"w1", "w2"}))
        yield {"folder": folder, "redis": redis_url, **processes}
    finally:
        for process in processes.values():
            process.stop()


def test_the_internal_api_needs_the_cluster_secret(cluster: dict) -> None:
    async def check() -> None:
        async with aiohttp.ClientSession() as http:
            url = cluster["w1"].url
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with http.get(f"{url}/internal/status", headers=headers) as response:
                    assert response.status == 401
            async with http.get(
                f"{url}/internal/status", headers={"Authorization": f"Bearer {SECRET}"}
            ) as response:
                assert response.status == 200 and (await response.json())["id"] == "w1"

    asyncio.run(check())


def test_sessions_spread_avatars_travel_and_any_gateway_ends_them(
    cluster: dict, faces_dir: Path
) -> None:
    a, b = cluster["a"].url, cluster["b"].url

    async def check() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{a}/api/avatars",
                data=(faces_dir / "obama.jpg").read_bytes(),
                headers={"Content-Type": "image/jpeg"},
            ) as response:
                assert response.status == 201
                avatar = await response.json()
            # Uploaded through a, known through b (and stored once: the same id again).
            async with http.get(f"{b}/api/avatars/{avatar['id']}") as response:
                assert response.status == 200 and await response.json() == avatar
            async with http.get(f"{b}/api/avatars/{avatar['id']}/preview") as response:
                assert response.status == 200 and (await response.read())[:2] == b"\xff\xd8"

            # Two sessions through b with that photo: one on each worker, both streaming.
            peers = [
                LipSyncPeer(b, _speech(), avatar=avatar["id"], keep=lambda image: image.shape)
                for _ in range(2)
            ]
            for peer in peers:
                await peer.connect(http)

            async def streaming() -> bool:
                return all(len(peer.received.video) >= 25 for peer in peers)

            await until(streaming, 20, "video from both sessions")
            for peer in peers:  # the photo's own size, not the default's 512 x 512
                assert peer.received.video[-1][2] == (avatar["height"], avatar["width"])
            listed = await health(http, a)
            assert by_worker(listed) == {"w1": 1, "w2": 1}
            # How each worker runs its engine: the animator has no backend, and batches of one.
            assert {(w["backend"], w["max_batch"]) for w in listed["workers"]} == {(None, 1)}

            async def full() -> bool:
                return by_worker(await health(http, b)) == {"w1": 2, "w2": 2}

            # Full: two more fill the workers, the fifth gets 503 with Retry-After.
            more = [LipSyncPeer(a, _speech()) for _ in range(2)]
            for peer in more:
                await peer.connect(http)
            await until(full, 3, "four sessions in b's health")
            async with http.post(
                f"{a}/api/sessions", json={"sdp": "v=0", "type": "offer"}
            ) as response:
                body = await response.json()
                assert response.status == 503 and body["error"]["code"] == "server_full"
                assert int(response.headers["Retry-After"]) > 0

            # DELETE through the other gateway ends them on their workers.
            for peer in (*peers, *more):
                peer.base_url = a if peer in peers else b
                assert await peer.close(http) == 204

            async def empty() -> bool:
                return by_worker(await health(http, a)) == {"w1": 0, "w2": 0}

            await until(empty, 5, "both workers empty")

    asyncio.run(check())


def test_a_push_session_through_a_gateway_plays_and_reports(cluster: dict) -> None:
    """Pushed audio at 48 kHz, through the gateway to a worker: played out, and its playback
    reported, as in one process."""

    async def check() -> None:
        async with aiohttp.ClientSession() as http:
            pusher = LipSyncPusher(cluster["a"].url, sample_rate=48_000)
            await pusher.connect(http)
            await pusher.wait_open()
            t = np.arange(48_000) / 48_000
            await pusher.push((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
            pusher.end_of_segment()

            async def finished() -> bool:
                return any(e["type"] == "playback_finished" for e in pusher.received.events)

            await until(finished, 10, "playback_finished")
            kinds = [e["type"] for e in pusher.received.events if e["type"].startswith("play")]
            assert kinds == ["playback_started", "playback_finished"]
            (done,) = [e for e in pusher.received.events if e["type"] == "playback_finished"]
            assert done["interrupted"] is False and abs(done["playback_position"] - 1.0) < 0.05
            assert await pusher.close(http) == 204

    asyncio.run(check())


def test_concurrent_offers_through_two_gateways_never_overshoot(cluster: dict) -> None:
    """Twelve offers at once, six through each gateway, for four slots: exactly four are
    placed, two on each worker."""

    async def check() -> None:
        pcs = []
        for _ in range(12):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver(SpeechTrack(np.zeros(1600, np.float32)), direction="sendrecv")
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            pcs.append(pc)
        async with aiohttp.ClientSession() as http:

            async def offer(i: int, pc: RTCPeerConnection) -> tuple[int, dict]:
                url = cluster["a" if i % 2 else "b"].url
                body = {"sdp": pc.localDescription.sdp, "type": "offer"}
                async with http.post(f"{url}/api/sessions", json=body) as response:
                    return response.status, await response.json()

            results = await asyncio.gather(*(offer(i, pc) for i, pc in enumerate(pcs)))
            statuses = sorted(status for status, _ in results)
            assert statuses == [201] * 4 + [503] * 8, statuses

            async def two_each() -> bool:
                return by_worker(await health(http, cluster["a"].url)) == {"w1": 2, "w2": 2}

            await until(two_each, 3, "two sessions on each worker")
            for status, body in results:
                if status == 201:
                    async with http.delete(
                        f"{cluster['b'].url}/api/sessions/{body['id']}"
                    ) as response:
                        assert response.status == 204
        for pc in pcs:
            await pc.close()

    asyncio.run(check())


def _metrics(text: str) -> dict[str, float]:
    """Each sample as name{labels} -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def test_metrics_parse_and_move_when_sessions_run(cluster: dict) -> None:
    async def check() -> None:
        async with aiohttp.ClientSession() as http:

            async def scrape(url: str) -> dict[str, float]:
                async with http.get(f"{url}/metrics") as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/plain")
                    return _metrics(await response.text())

            gateway_before = await scrape(cluster["a"].url)
            workers_before = [await scrape(cluster[w].url) for w in ("w1", "w2")]
            assert gateway_before["lipsync_workers{state=serving}"] == 2
            peer = LipSyncPeer(cluster["a"].url, _speech())
            await peer.connect(http)

            async def streaming() -> bool:
                return len(peer.received.video) >= 50

            await until(streaming, 20, "two seconds of video")
            gateway = await scrape(cluster["a"].url)
            workers = [await scrape(cluster[w].url) for w in ("w1", "w2")]
            placed = "lipsync_placements_total{outcome=placed}"
            assert gateway[placed] == gateway_before.get(placed, 0) + 1
            moved = [
                (after["lipsync_frames_delivered_total{}"]
                 - before["lipsync_frames_delivered_total{}"])
                for before, after in zip(workers_before, workers)
            ]  # fmt: skip
            busy = workers[moved.index(max(moved))]
            assert max(moved) >= 40 and min(moved) == 0
            assert busy["lipsync_sessions_live{}"] == 1
            assert busy["lipsync_frames_inferred_total{}"] > 0
            assert busy["lipsync_mouth_age_seconds_count{}"] >= 40
            assert (
                0.1
                < busy["lipsync_mouth_age_seconds_sum{}"]
                / busy["lipsync_mouth_age_seconds_count{}"]
                < 1.0
            )
            assert busy["lipsync_inference_batch_seconds_count{}"] > 0
            await peer.close(http)

    asyncio.run(check())


def test_a_killed_worker_leaves_within_six_seconds(cluster: dict) -> None:
    """SIGKILL: no goodbye. Its record lapses, its sessions are 404 at once, and new sessions
    go to the workers still alive."""
    extra = worker(cluster["folder"], cluster["redis"], "w3", max_sessions=4)

    async def check() -> float:
        a = cluster["a"].url
        await wait_workers(a, {"w1", "w2", "w3"})
        async with aiohttp.ClientSession() as http:
            peer = LipSyncPeer(a, _speech())  # w3 has the most headroom
            await peer.connect(http)

            async def on_w3() -> bool:
                return by_worker(await health(http, a)).get("w3") == 1

            await until(on_w3, 3, "the session on w3")
            extra.popen.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            extra.popen.wait()
            peer.base_url = cluster["b"].url
            assert await peer.close(http) == 404  # at once: its session died with it

            async def gone() -> bool:
                return "w3" not in by_worker(await health(http, a))

            left = await until(gone, 10, "the killed worker leaving health")
            for _ in range(2):
                other = LipSyncPeer(cluster["b"].url, _speech())
                await other.connect(http)
                await other.close(http)
            assert left < 10
            return time.monotonic() - killed

    try:
        left = asyncio.run(check())
    finally:
        extra.stop()
    print(f"a killed worker left health after {left:.1f} s")
    assert left < 6.0


def test_sigterm_drains_a_worker(cluster: dict) -> None:
    """SIGTERM: the worker takes no new session, its live one goes on until it ends, and
    then the worker exits at once, cleanly."""
    extra = worker(cluster["folder"], cluster["redis"], "w4", max_sessions=4)

    async def check() -> None:
        a = cluster["a"].url
        await wait_workers(a, {"w1", "w2", "w4"})
        async with aiohttp.ClientSession() as http:
            peer = LipSyncPeer(a, _speech())  # w4 has the most headroom
            await peer.connect(http)

            async def on_w4() -> bool:
                return by_worker(await health(http, a)).get("w4") == 1

            await until(on_w4, 3, "the session on w4")
            extra.popen.send_signal(signal.SIGTERM)

            async def draining() -> bool:
                states = {w["id"]: w["state"] for w in (await health(http, a))["workers"]}
                return states.get("w4") == "draining"

            await until(draining, 3, "w4 draining")
            others = [LipSyncPeer(a, _speech()) for _ in range(2)]
            for other in others:
                await other.connect(http)

            async def elsewhere() -> bool:
                sessions = by_worker(await health(http, a))
                return sessions["w4"] == 1 and sessions["w1"] + sessions["w2"] == 2

            await until(elsewhere, 3, "the new sessions on the other workers")
            frames = len(peer.received.video)
            await asyncio.sleep(2.0)
            assert len(peer.received.video) >= frames + 40  # still streaming
            assert extra.popen.poll() is None
            assert await peer.close(http) == 204
            ended = time.monotonic()
            while extra.popen.poll() is None:
                assert time.monotonic() - ended < 3, "the drained worker did not exit"
                await asyncio.sleep(0.05)
            assert extra.popen.returncode == 0
            for other in others:
                await other.close(http)

    try:
        asyncio.run(check())
    finally:
        extra.stop()


def test_the_gateway_loads_no_torch(cluster: dict) -> None:
    maps = Path(f"/proc/{cluster['a'].popen.pid}/maps").read_text()
    for library in ("libtorch", "onnxruntime", "libavcodec", "libopus", "libvpx"):
        assert library not in maps, library
    rss = int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{cluster['a'].popen.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        )
    )
    print(f"gateway RSS: {rss / 1024:.0f} MB")
    assert rss < 120 * 1024


def test_serve_with_two_workers_places_one_session_on_each(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "signaling.cli", "serve", "--offline", "--workers", "2",
         "--port", str(port), "--min-fps", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def check() -> None:
        status = await wait_workers(url, {"local-0", "local-1"})
        assert len(status["workers"]) == 2
        async with aiohttp.ClientSession() as http:
            peers = [LipSyncPeer(url, _speech()) for _ in range(2)]
            for peer in peers:
                await peer.connect(http)

            async def streaming() -> bool:
                return all(len(p.received.video) >= 25 for p in peers)

            await until(streaming, 20, "video from both")
            assert by_worker(await health(http, url)) == {"local-0": 1, "local-1": 1}
            for peer in peers:
                assert await peer.close(http) == 204

    try:
        asyncio.run(check())
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        output = process.communicate()[0].decode()
    assert "2 media workers ready" in output
