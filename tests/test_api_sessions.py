"""Session API errors: each bad input gets its status and a JSON error, and nothing breaks."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection

from client.peer import SpeechTrack
from signaling.config import ServerConfig
from signaling.server import SESSIONS, build_app
from wav2lip.animator import Animator


async def _offer(audio: str = "sendrecv", video: str | None = "recvonly") -> tuple:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(SpeechTrack(np.zeros(1600, np.float32)), direction=audio)
    if video:
        pc.addTransceiver("video", direction=video)
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@pytest.fixture
async def server():
    app = build_app(
        ServerConfig(offline=True, max_sessions=1, session_idle_timeout=2), engine=Animator()
    )
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


async def _post(http, server, body=None, data=None, headers=None):
    started = time.monotonic()
    async with http.post(
        server.make_url("/api/sessions"), json=body, data=data, headers=headers
    ) as response:
        payload = await response.json()
        assert time.monotonic() - started < 5  # every error is quick
        return response.status, payload, response.headers


async def test_bad_session_requests(server) -> None:
    pc, sdp = await _offer()
    async with aiohttp.ClientSession() as http:
        cases = [
            (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400),
            (dict(body=[1, 2]), 400),
            (dict(body={"type": "offer"}), 400),
            (dict(body={"sdp": sdp, "type": "answer"}), 400),
            (dict(body={"sdp": "v=0\r\nthis is not sdp", "type": "offer"}), 400),
            (dict(body={"sdp": "v=0\r\nm=audio x", "type": "offer"}), 400),
            (dict(body={"sdp": sdp, "type": "offer", "avatar": "nope"}), 404),
            (dict(body={"sdp": sdp, "type": "offer", "avatar": 7}), 400),
            (dict(body={"sdp": sdp, "type": "offer", "input": "speaker"}), 400),
            (dict(body={"sdp": sdp, "type": "offer", "input": "push", "sample_rate": 44100}), 400),
            (dict(body={"sdp": sdp, "type": "offer", "input": "push", "sample_rate": "24k"}), 400),
            (dict(body={"sdp": sdp, "type": "offer", "input": "push", "sample_rate": 16e3}), 400),
        ]
        for kwargs, status in cases:
            got, payload, _ = await _post(http, server, **kwargs)
            assert got == status, (kwargs, payload)
            assert set(payload["error"]) == {"code", "message"} and payload["error"]["message"]
        no_audio_pc, no_audio = await _offer(audio="recvonly")
        got, payload, _ = await _post(http, server, body={"sdp": no_audio, "type": "offer"})
        assert got == 400 and "audio" in payload["error"]["message"]
        got, payload, _ = await _post(
            http, server, body={"sdp": sdp, "type": "offer", "input": "push"}
        )
        assert got == 400 and '"audio"' in payload["error"]["message"]  # no data channels
        no_video_pc, no_video = await _offer(video=None)
        got, payload, _ = await _post(http, server, body={"sdp": no_video, "type": "offer"})
        assert got == 400 and "video" in payload["error"]["message"]
        async with http.delete(server.make_url("/api/sessions/unknown")) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "session_not_found"

        # At the limit: 503 with Retry-After; the first session is unaffected.
        got, first, _ = await _post(http, server, body={"sdp": sdp, "type": "offer"})
        assert got == 201 and first["type"] == "answer" and "m=video" in first["sdp"]
        other_pc, other = await _offer()
        got, payload, headers = await _post(http, server, body={"sdp": other, "type": "offer"})
        assert got == 503 and int(headers["Retry-After"]) > 0
        assert payload["error"]["code"] == "server_full"
        async with http.get(server.make_url("/api/health")) as response:
            health = await response.json()
        assert health["status"] == "ok" and health["sessions"] == 1, health
        async with http.delete(server.make_url(f"/api/sessions/{first['id']}")) as response:
            assert response.status == 204
        async with http.get(server.make_url("/api/health")) as response:
            assert (await response.json())["sessions"] == 0
    for peer in (pc, no_audio_pc, no_video_pc, other_pc):
        await peer.close()


async def test_session_without_media_times_out(server) -> None:
    """A peer that never connects is freed after the idle timeout (2 s here)."""
    pc, sdp = await _offer()
    async with aiohttp.ClientSession() as http:
        status, answer, _ = await _post(http, server, body={"sdp": sdp, "type": "offer"})
        assert status == 201
        manager = server.app[SESSIONS]
        session = manager.sessions[answer["id"]]
        await pc.close()  # never applies the answer: no media will ever flow
        for _ in range(50):
            if not manager.sessions:
                break
            await asyncio.sleep(0.1)
        assert not manager.sessions and session.closed
        assert session.pc.connectionState == "closed"


async def test_the_browsers_preferred_codec_is_used(server, faces_dir) -> None:
    """H.264 offered first gets H.264; frames arrive in it."""
    from client.peer import LipSyncPeer

    audio = np.zeros(16000 * 3, np.float32)
    peer = LipSyncPeer(str(server.make_url("/")), audio, receive_audio=False, video_codec="H264")
    async with aiohttp.ClientSession() as http:
        await peer.connect(http)
        await asyncio.sleep(2.0)
        session = server.app[SESSIONS].sessions[peer.session_id]
        answer = session.pc.localDescription.sdp
        await peer.close(http)
    video_section = answer[answer.index("m=video") :]
    first_payload = video_section.split("\r\n")[0].split()[3]
    assert f"a=rtpmap:{first_payload} H264/90000" in video_section
    assert len(peer.received.video) > 10


async def test_closing_the_connection_ends_the_session(server) -> None:
    from client.peer import LipSyncPeer

    peer = LipSyncPeer(str(server.make_url("/")), np.zeros(16000, np.float32))
    async with aiohttp.ClientSession() as http:
        await peer.connect(http)
        manager = server.app[SESSIONS]
        for _ in range(50):
            session = manager.sessions.get(peer.session_id)
            if session is not None and session.clock.started.is_set():
                break
            await asyncio.sleep(0.1)
        assert session.clock.started.is_set()
        await peer._pc.close()  # no DELETE: the peer just goes away
        for _ in range(100):
            if not manager.sessions:
                break
            await asyncio.sleep(0.1)
        assert not manager.sessions and session.closed


async def test_concurrent_offers_never_exceed_the_limit(server) -> None:
    offers = [await _offer() for _ in range(5)]
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(_post(http, server, body={"sdp": sdp, "type": "offer"}) for _, sdp in offers)
        )
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [201, 503, 503, 503, 503]
        assert len(server.app[SESSIONS].sessions) == 1
    for pc, _ in offers:
        await pc.close()


def test_a_delay_too_short_for_the_audio_window_is_refused() -> None:
    # The window's look-ahead (172.5 ms as trained, 212.5 ms as the official inference) and
    # the jitter allowance.
    with pytest.raises(ValueError, match=r"--delay must be more than 0\.2325"):
        build_app(ServerConfig(offline=True), engine=Animator(), delay=0.2)
    build_app(ServerConfig(offline=True), engine=Animator(), delay=0.24)
    with pytest.raises(ValueError, match=r"--delay must be more than 0\.2725"):
        build_app(ServerConfig(offline=True, alignment="official"), engine=Animator(), delay=0.24)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["--backend", "onnxruntime-int8", "--device", "cuda"], "runs on the CPU"),
        (["--max-batch", "0"], "--max-batch must be 1 to 64, got 0"),
        (["--max-batch", "65"], "--max-batch must be 1 to 64, got 65"),
        (["--inference-threads", "0"], "--inference-threads must be at least 1, got 0"),
    ],
)
def test_engine_flags_that_cannot_work_are_refused(flags, message, capsys) -> None:
    """Refused before anything loads, with the flag named: not a traceback from the engine."""
    from signaling.cli import main

    with pytest.raises(SystemExit) if "invalid choice" in message else contextlib.nullcontext():
        assert main(["serve", "--offline", *flags]) == 2
    assert message in capsys.readouterr().err


def test_onnx_runtime_workers_stay_on_the_cpu(monkeypatch) -> None:
    """`serve --workers` spreads its workers over the GPUs, one per four cores; ONNX Runtime's
    run on the CPU, one for the whole machine (on two GPUs, each was refused at start for the
    CUDA device it was given)."""
    import os

    from signaling import gateway
    from signaling.cli import local_devices

    monkeypatch.setattr(gateway, "gpu_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_devices(ServerConfig(), None) == ["cuda:0", "cuda:1"] * 2
    assert local_devices(ServerConfig(backend="onnxruntime-int8"), None) == ["cpu"]
    assert local_devices(ServerConfig(backend="onnxruntime"), 2) == ["cpu", "cpu"]
    assert local_devices(ServerConfig(device="cuda:1"), 2) == ["cuda:1", "cuda:1"]


def test_workers_on_a_cpu_split_its_cores(monkeypatch) -> None:
    """`serve --workers N` on a CPU gives each worker an Nth of the cores for inference (each
    took every core, and N workers' threads waited on each other); on GPUs, or when
    --inference-threads is given, it passes nothing of its own."""
    import os

    from signaling import cli, gateway

    started: list[list[str]] = []

    async def serve_local_workers(config, commands, urls, secret, env) -> int:
        started.extend(commands)
        return 0

    def threads(command: list[str]) -> list[str]:
        return [command[i + 1] for i, a in enumerate(command) if a == "--inference-threads"]

    def serve(*flags: str) -> list[list[str]]:
        """The inference threads each worker is started with (`main` would end the process
        once its server stops, so the command runs without it)."""
        started.clear()
        args = cli.build_parser().parse_args(["serve", "--offline", *flags])
        assert cli._serve_workers(args, cli.config_from_args(args)) == 0
        return [threads(command) for command in started]

    monkeypatch.setattr(gateway, "serve_local_workers", serve_local_workers)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(gateway, "gpu_count", lambda: 0)
    assert serve("--workers", "4") == [["4"]] * 4
    assert serve("--workers", "2", "--inference-threads", "3") == [["3"]] * 2
    monkeypatch.setattr(gateway, "gpu_count", lambda: 2)
    assert serve("--workers", "2") == [[], []]
    assert serve("--workers", "2", "--backend", "onnxruntime") == [["8"]] * 2


def test_inference_threads_reach_onnx_runtime(checkpoint_path) -> None:
    """--inference-threads sets the worker process's threads, PyTorch's and ONNX Runtime's
    (in a process of its own: the setting is the process's)."""
    import subprocess
    import sys

    program = (
        "import sys, torch; from pathlib import Path;"
        "from rtc_server.engines import EngineChoice, load_engine;"
        "e = load_engine(EngineChoice(Path(sys.argv[1]), offline=True, device='cpu', threads=1));"
        "ort = e._onnx._session.get_session_options().intra_op_num_threads;"
        "print(torch.get_num_threads(), ort)"
    )
    out = subprocess.run(
        [sys.executable, "-c", program, str(checkpoint_path)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert out.stdout.split() == ["1", "1"], out.stderr


def test_the_front_door_knows_the_engine_backends() -> None:
    """The flag's choices, listed without loading PyTorch, are the engine's own."""
    from signaling.config import BACKENDS
    from wav2lip.engine import BACKENDS as ENGINE_BACKENDS

    assert ("auto", *ENGINE_BACKENDS) == BACKENDS


def test_serve_freezes_what_start_up_made(monkeypatch) -> None:
    """The garbage collector's full passes skip the model and libraries once the server has
    started: a session's end no longer stalls every other session for 100 ms or more."""
    import asyncio
    import gc

    from aiohttp import web

    from signaling import server as server_module

    started: list[web.Application] = []

    async def run(app: web.Application, *_) -> int:
        started.append(app)
        return 0

    monkeypatch.setattr(server_module, "run", run)
    assert server_module.serve(ServerConfig(offline=True)) == 0
    (app,) = started
    assert app.on_startup[-1] is server_module._freeze_heap  # after everything else starts
    gc.unfreeze()
    try:
        asyncio.run(server_module._freeze_heap(app))
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
