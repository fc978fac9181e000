"""ICE servers for the browser and for aiortc, with coturn REST-style TURN logins."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCIceGatherer

from signaling.config import ServerConfig
from signaling.ice import ice_servers, rtc_configuration
from signaling.server import build_app
from wav2lip.animator import Animator

SECRET = "coturn-shared-secret"
URLS = (
    "stun:127.0.0.1:3478",
    "turn:127.0.0.1:3478?transport=udp",
    "turns:127.0.0.1:5349?transport=tcp",
    "stun:127.0.0.2",
)


def check_turn_login(server: dict, ttl: int, now: float) -> None:
    """The coturn REST scheme, recomputed here independently of the code under test."""
    expiry, name = server["username"].split(":")
    assert name and abs(int(expiry) - (now + ttl)) <= 2
    digest = hmac.new(SECRET.encode(), server["username"].encode(), hashlib.sha1).digest()
    assert server["credential"] == base64.b64encode(digest).decode()


def test_nothing_configured_means_no_servers() -> None:
    config = ServerConfig()
    assert ice_servers(config) == []
    assert rtc_configuration(config).iceServers == []


def test_aiortc_gets_no_public_server_by_default() -> None:
    """Left unset, aiortc would fall back to Google's STUN server; the empty list prevents it."""
    configured = RTCIceGatherer(rtc_configuration(ServerConfig()).iceServers)
    assert configured._connection.stun_server is None
    assert configured._connection.turn_server is None
    unset = RTCIceGatherer(None)
    assert unset._connection.stun_server is not None  # what the explicit empty list avoids


def test_stun_and_turn_servers() -> None:
    config = ServerConfig(ice_servers=URLS, turn_secret=SECRET, turn_ttl=3600)
    servers = ice_servers(config)
    assert servers[0] == {"urls": ["stun:127.0.0.1:3478", "stun:127.0.0.2"]}
    assert servers[1]["urls"] == [
        "turn:127.0.0.1:3478?transport=udp",
        "turns:127.0.0.1:5349?transport=tcp",
    ]
    check_turn_login(servers[1], 3600, time.time())
    assert len(servers) == 2


def test_logins_follow_the_clock() -> None:
    config = ServerConfig(ice_servers=URLS[1:2], turn_secret=SECRET, turn_ttl=600)
    (turn,) = ice_servers(config, name="alice", now=1_000_000)
    assert turn["username"] == "1000600:alice"
    check_turn_login(turn, 600, 1_000_000)
    (later,) = ice_servers(config, name="alice", now=1_000_100)
    assert later["username"] == "1000700:alice"
    assert later["credential"] != turn["credential"]


def test_aiortc_configuration_has_the_same_servers() -> None:
    config = ServerConfig(ice_servers=URLS, turn_secret=SECRET)
    now = time.time()
    browser = ice_servers(config, now=now)
    aiortc = rtc_configuration(config, now=now).iceServers
    assert [(s.urls, s.username, s.credential) for s in aiortc] == [
        (s["urls"], s.get("username"), s.get("credential")) for s in browser
    ]
    assert aiortc[0].username is None and aiortc[0].credential is None
    check_turn_login(
        {"username": aiortc[1].username, "credential": aiortc[1].credential}, config.turn_ttl, now
    )


@pytest.mark.parametrize(
    ("urls", "secret", "complaint"),
    [
        (("http://127.0.0.1",), None, "stun:, turn: or turns:"),
        (("stun:",), None, "malformed"),
        (("turn:127.0.0.1",), None, "--turn-secret"),
        (("stun:127.0.0.1",), SECRET, "no turn:"),
    ],
)
def test_bad_ice_config_is_refused(
    urls: tuple[str, ...], secret: str | None, complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        ServerConfig(ice_servers=urls, turn_secret=secret)


async def test_ice_servers_endpoint(tmp_path: Path) -> None:
    config = ServerConfig(
        offline=True, cache=tmp_path, ice_servers=URLS, turn_secret=SECRET, turn_ttl=7200
    )
    app = build_app(config, engine=Animator())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.get("/api/ice-servers")
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        servers = (await response.json())["iceServers"]
        assert servers[0] == {"urls": ["stun:127.0.0.1:3478", "stun:127.0.0.2"]}
        check_turn_login(servers[1], 7200, time.time())

        health = await (await client.get("/api/health")).json()
        assert health["workers"][0]["server_ice"] == {
            "stun": "stun:127.0.0.1:3478",
            "turn": "turn:127.0.0.1:3478?transport=udp",
        }

    empty = build_app(ServerConfig(offline=True, cache=tmp_path), engine=Animator())
    async with TestClient(TestServer(empty, host="127.0.0.1")) as client:
        assert await (await client.get("/api/ice-servers")).json() == {"iceServers": []}
