"""Clients someone else wrote, as installed from Debian by scripts/test.sh: GStreamer's
webrtcbin as a caller (VP8, then H.264), and `simple-whip-client` feeding a session over WHIP
that a WHEP viewer watches.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from client.peer import LipSyncViewer
from signaling.config import ServerConfig
from signaling.server import SESSIONS
from tests.conftest import ROOT
from tests.servers import Served, serve_in_thread

pytestmark = pytest.mark.slow

DEBIAN_PYTHON = Path("/usr/bin/python3")  # with Debian's PyGObject (python3-gi)
# libnice links gupnp-igd, which links libsoup 3, and whip-client links libsoup 2: the two in
# one process abort it at start. This stands in for gupnp-igd (no UPnP port mapping: nothing
# a client on loopback or behind TURN needs), so libsoup 3 is never loaded.
GUPNP_IGD_STUB = """
unsigned long gupnp_simple_igd_get_type(void) { return 20 << 2; /* G_TYPE_OBJECT */ }
void *gupnp_simple_igd_thread_new(void) { return 0; }
void gupnp_simple_igd_add_port(void *igd, const char *protocol, unsigned external_port,
                               const char *local_ip, unsigned local_port,
                               unsigned lease_duration, const char *description) {}
void gupnp_simple_igd_remove_port_local(void *igd, const char *protocol, const char *local_ip,
                                        unsigned short local_port) {}
"""
WHIP_AUDIO = (
    "audiotestsrc is-live=true wave=sine freq=300 volume=0.4 ! audioconvert ! audioresample "
    "! queue ! opusenc ! rtpopuspay pt=100 ssrc=1 ! queue "
    "! application/x-rtp,media=audio,encoding-name=OPUS,payload=100"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = ServerConfig(offline=True, cache=tmp_path_factory.mktemp("cache"))
    with serve_in_thread(config) as served:
        yield served


@pytest.mark.parametrize("codec", ["VP8", "H264"])
def test_gstreamer_webrtcbin_gets_the_video_and_audio(served: Served, codec: str) -> None:
    """webrtcbin's DTLS certificate is RSA: this fails with aiortc's own cipher list."""
    if not DEBIAN_PYTHON.exists():
        pytest.fail("Debian's python3 with python3-gi is needed; scripts/test.sh installs it")
    result = subprocess.run(
        [str(DEBIAN_PYTHON), str(ROOT / "tests" / "gst_peer.py"), served.url, codec, "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"webrtcbin {codec}: {found}")
    assert found["error"] is None, (found, result.stderr[-2000:])
    assert (found["width"], found["height"]) == (512, 512)  # the built-in photo
    assert found["video_fps"] > 20
    assert found["audio_buffers"] > 100  # 20 ms each: the returned audio, for 5 s


def _whip_client(folder: Path) -> tuple[str, dict[str, str]]:
    binary = shutil.which("whip-client")
    gcc = shutil.which("gcc")
    if binary is None or gcc is None:
        pytest.fail("whip-client (simple-whip-client) and gcc are needed; scripts/test.sh")
    source = folder / "gupnp_igd_stub.c"
    source.write_text(GUPNP_IGD_STUB)
    library = folder / "libgupnp-igd-1.0.so.4"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wl,-soname,libgupnp-igd-1.0.so.4", "-o", str(library),
         str(source)],
        check=True,
    )  # fmt: skip
    return binary, {"LD_LIBRARY_PATH": str(folder)}


def test_simple_whip_client_feeds_a_session_that_a_whep_viewer_watches(
    served: Served, tmp_path: Path
) -> None:
    binary, env = _whip_client(tmp_path)
    sessions = served.app[SESSIONS].sessions
    before = set(sessions)  # the webrtcbin tests' sessions may not have ended yet
    log = tmp_path / "whip-client.log"
    with open(log, "wb") as out:
        client = subprocess.Popen(
            [binary, "-u", f"{served.url}/whip", "-A", WHIP_AUDIO, "-n", "-l", "4"],
            env={"PATH": "/usr/bin:/bin", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    watched: list[str] = []

    async def watch() -> LipSyncViewer:
        deadline = time.monotonic() + 20
        while not set(sessions) - before:
            assert client.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.1)
        (session_id,) = set(sessions) - before
        viewer = LipSyncViewer(served.url, session_id, keep=lambda image: image.shape)
        watched.append(session_id)
        async with aiohttp.ClientSession() as http:
            await viewer.connect(http)
            deadline = time.monotonic() + 20
            while len(viewer.received.video) < 75:
                assert time.monotonic() < deadline, "no video at the viewer"
                await asyncio.sleep(0.1)
            await viewer.close(http)
        return viewer

    try:
        viewer = asyncio.run(watch())
        times = [t for t, _, _ in viewer.received.video[-50:]]
        assert (len(times) - 1) / (times[-1] - times[0]) > 20
        assert viewer.received.video[-1][2] == (512, 512)
        loudest = max(float(np.abs(chunk).max()) for _, _, chunk in viewer.received.audio)
        assert loudest > 0.05  # whip-client's tone, returned to the viewer
        # Stopping the encoder DELETEs its session.
        client.send_signal(signal.SIGINT)
        client.wait(timeout=15)
        deadline = time.monotonic() + 10
        while watched[0] in sessions:
            assert time.monotonic() < deadline, "the session outlived its encoder"
            time.sleep(0.1)
    finally:
        client.kill()
        client.wait()
    output = log.read_text()
    assert "libsoup" not in output
    print(output[-600:])
