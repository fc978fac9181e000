"""Other sites, strangers and hostile clients: what the front door refuses, and how.

Each test talks to a real server (aiohttp's test server, the animator as its engine) over
loopback; every refusal must be a JSON error with the right status, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection
from PIL import Image
from yarl import URL

from client.peer import SpeechTrack
from signaling import auth
from signaling.auth import check_token, mint_token
from signaling.config import ServerConfig
from signaling.runner import app_runner
from signaling.server import SESSIONS, build_app
from wav2lip.animator import Animator

KEY = "k" * 32
FOREIGN = "https://evil.example"


@dataclass
class Live:
    """A server started as `lipsync serve` starts it (aiohttp's test server differs: it
    cancels a handler whose client hangs up, and keeps connections alive for an hour)."""

    app: web.Application
    port: int

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")


@contextlib.asynccontextmanager
async def serving(**settings) -> AsyncIterator[Live]:
    config = ServerConfig(offline=True, max_sessions=4, **settings)
    app = build_app(config, engine=Animator())
    runner = app_runner(app, config)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield Live(app, runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def _offer(audio_tracks: int = 1) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for _ in range(audio_tracks):
        pc.addTransceiver(SpeechTrack(np.zeros(1600, np.float32)), direction="sendrecv")
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("events")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def _photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (200, 200), (128, 128, 128)).save(out, "PNG")
    return out.getvalue()


async def _error(response: aiohttp.ClientResponse, status: int, code: str | None = None) -> dict:
    body = await response.json()
    assert response.status == status, body
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- other sites -------------------------------------------------------------------------


async def test_json_endpoints_take_only_json() -> None:
    """A page on another site can send text/plain or a form without a preflight: such bodies
    are refused whatever they contain."""
    pc, sdp = await _offer()
    async with serving() as server, aiohttp.ClientSession() as http:
        url = server.make_url("/api/sessions")
        offer = f'{{"sdp": {sdp!r}, "type": "offer"}}'.replace("'", '"')
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            async with http.post(url, data=offer.encode(), headers=headers) as response:
                await _error(response, 415, "unsupported_type")
        assert not server.app[SESSIONS].sessions
        async with http.post(url, json={"sdp": sdp, "type": "offer"}) as response:
            assert response.status == 201  # the same offer, labelled as JSON
    await pc.close()


async def test_other_sites_cannot_change_anything() -> None:
    pc, sdp = await _offer()
    async with serving() as server, aiohttp.ClientSession() as http:
        own = f"http://127.0.0.1:{server.port}"
        offer = {"sdp": sdp, "type": "offer"}
        for origin in (FOREIGN, "null", f"http://127.0.0.1:{server.port + 1}", "http://localhost"):
            headers = {"Origin": origin}
            async with http.post(
                server.make_url("/api/sessions"), json=offer, headers=headers
            ) as response:
                await _error(response, 403, "forbidden_origin")
                assert "Access-Control-Allow-Origin" not in response.headers
            form = aiohttp.FormData()
            form.add_field("image", _photo(), filename="a.png", content_type="image/png")
            async with http.post(
                server.make_url("/api/avatars"), data=form, headers=headers
            ) as response:
                await _error(response, 403, "forbidden_origin")
            async with http.delete(
                server.make_url("/api/sessions/whatever"), headers=headers
            ) as response:
                await _error(response, 403, "forbidden_origin")
            # Reading is left to CORS: the browser hides the answer from the foreign page.
            async with http.get(server.make_url("/api/health"), headers=headers) as response:
                assert response.status == 200
                assert "Access-Control-Allow-Origin" not in response.headers
        assert not server.app[SESSIONS].sessions
        # The server's own page passes.
        async with http.post(
            server.make_url("/api/sessions"), json=offer, headers={"Origin": own}
        ) as response:
            assert response.status == 201
    await pc.close()


async def test_an_allowed_origin_gets_cors() -> None:
    site = "https://app.example.com"
    async with serving(allowed_origins=(site + "/",)) as server, aiohttp.ClientSession() as http:
        preflight = {"Origin": site, "Access-Control-Request-Method": "POST"}
        async with http.options(server.make_url("/api/sessions"), headers=preflight) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == site
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
            assert "POST" in response.headers["Access-Control-Allow-Methods"]
        foreign = {**preflight, "Origin": FOREIGN}
        async with http.options(server.make_url("/api/sessions"), headers=foreign) as response:
            await _error(response, 403, "forbidden_origin")
            assert "Access-Control-Allow-Origin" not in response.headers
        async with http.post(
            server.make_url("/api/avatars"),
            data=_photo(),
            headers={"Origin": site, "Content-Type": "image/png"},
        ) as response:
            await _error(response, 422, "no_face")  # reached the handler
            assert response.headers["Access-Control-Allow-Origin"] == site
            assert response.headers["Vary"] == "Origin"


def test_allowed_origins_must_be_origins() -> None:
    with pytest.raises(ValueError, match="--allowed-origin"):
        ServerConfig(allowed_origins=("https://app.example.com/path",))
    with pytest.raises(ValueError, match="--allowed-origin"):
        ServerConfig(allowed_origins=("app.example.com",))
    assert ServerConfig(allowed_origins=("HTTPS://App.Example.com:443",)).allowed_origins == (
        "https://app.example.com",
    )


async def test_only_the_servers_own_host_names_are_answered() -> None:
    """DNS rebinding: a page on rebind.evil whose name now points here asks with its own
    Host, and gets nothing, TURN logins least of all."""
    settings = dict(
        public_hosts=("lipsync.example",),
        ice_servers=("turn:127.0.0.1:3478",),
        turn_secret="s",
    )
    async with serving(**settings) as server, aiohttp.ClientSession() as http:
        port = server.port
        for host in ("rebind.evil", f"rebind.evil:{port}", "localhost.evil", "[::2]", "bad host"):
            async with http.get(
                server.make_url("/api/ice-servers"), headers={"Host": host}
            ) as response:
                error = await _error(response, 421, "unknown_host")
                assert "--public-host" in error["message"]
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LipSync.Example"):
            async with http.get(
                server.make_url("/api/ice-servers"), headers={"Host": host}
            ) as response:
                assert response.status == 200, host
        async with http.get(server.make_url("/"), headers={"Host": "rebind.evil"}) as response:
            assert response.status == 421  # the page too


# -- who may use it ----------------------------------------------------------------------


async def test_with_a_key_the_api_needs_it_or_a_token() -> None:
    pc, sdp = await _offer()
    settings = dict(api_key=KEY, ice_servers=("turn:127.0.0.1:3478",), turn_secret="s")
    async with serving(**settings) as server, aiohttp.ClientSession() as http:

        def url(path: str):
            return server.make_url(path)

        async with http.get(url("/api/health")) as response:
            assert response.status == 200 and (await response.json())["auth"] == "key"
        for method, path in (
            ("GET", "/api/ice-servers"),
            ("GET", "/api/avatars/default"),
            ("POST", "/api/sessions"),
            ("POST", "/api/tokens"),
            ("DELETE", "/api/sessions/x"),
            ("GET", "/api/nothing-here"),
            ("GET", "/metrics"),
        ):
            async with http.request(method, url(path)) as response:
                await _error(response, 401, "unauthorized")
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(
            url("/api/ice-servers"), headers={"Authorization": "Bearer " + "x" * 32}
        ) as response:
            await _error(response, 401, "bad_token")

        operator = {"Authorization": f"Bearer {KEY}"}
        async with http.post(url("/api/tokens"), headers=operator) as response:
            assert response.status == 201
            minted = await response.json()
        assert minted["expires_in"] == 600 and minted["scope"] == ["avatars", "sessions"]
        assert minted["page"] == f"/#token={minted['token']}"
        caller = {"Authorization": f"Bearer {minted['token']}"}

        # The token starts a session and gets TURN logins...
        async with http.get(url("/api/ice-servers"), headers=caller) as response:
            turn = (await response.json())["iceServers"][0]
            assert response.status == 200 and turn["credential"]
            expiry = int(turn["username"].split(":")[0])
            assert abs(expiry - (time.time() + 6 * 3600)) < 5  # the --turn-ttl default
        async with http.post(
            url("/api/sessions"), json={"sdp": sdp, "type": "offer"}, headers=caller
        ) as response:
            assert response.status == 201
            session_id = (await response.json())["id"]
        async with http.delete(url(f"/api/sessions/{session_id}"), headers=caller) as response:
            assert response.status == 204
        # ...but cannot mint tokens, nor read the metrics.
        async with http.post(url("/api/tokens"), headers=caller) as response:
            await _error(response, 403, "insufficient_scope")
        async with http.get(url("/metrics"), headers=caller) as response:
            assert response.status == 403
        async with http.get(url("/metrics"), headers=operator) as response:
            assert response.status == 200 and "lipsync_sessions_started_total" in (
                await response.text()
            )

        # A narrower token: avatars only.
        async with http.post(
            url("/api/tokens"), json={"scope": ["avatars"], "ttl": 60}, headers=operator
        ) as response:
            narrow = {"Authorization": f"Bearer {(await response.json())['token']}"}
        for method, path in (("GET", "/api/ice-servers"), ("POST", "/api/sessions")):
            async with http.request(method, url(path), headers=narrow) as response:
                await _error(response, 403, "insufficient_scope")
        async with http.get(url("/api/avatars/default"), headers=narrow) as response:
            assert response.status == 200

        # Expired and forged tokens.
        expired = mint_token(KEY, 60, now=time.time() - 61)
        forged = mint_token("another key of 32 characters....", 600)
        payload, _, signature = minted["token"].rpartition(".")
        tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
        for token, code in ((expired, "token_expired"), (forged, "bad_token"),
                            (tampered, "bad_token"), ("lst1..", "bad_token")):  # fmt: skip
            async with http.get(
                url("/api/ice-servers"), headers={"Authorization": f"Bearer {token}"}
            ) as response:
                await _error(response, 401, code)

        for body in ({"ttl": 0}, {"ttl": 10**9}, {"ttl": "1"}, {"scope": ["admin"]}, {"scope": []}):
            async with http.post(url("/api/tokens"), json=body, headers=operator) as response:
                await _error(response, 400)
        async with http.post(
            url("/api/tokens"), data="{}", headers={**operator, "Content-Type": "text/plain"}
        ) as response:
            await _error(response, 415, "unsupported_type")
    await pc.close()


def test_tokens_and_keys_are_compared_in_constant_time(monkeypatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    token = mint_token(KEY, 60)
    assert check_token(KEY, token) == frozenset({"avatars", "sessions"})
    assert len(compared) == 1
    assert auth.identify(KEY, f"Bearer {KEY}").is_operator
    assert len(compared) == 2


def test_the_key_can_come_from_the_environment(monkeypatch) -> None:
    from signaling.cli import build_parser, config_from_args

    monkeypatch.setenv("LIPSYNC_API_KEY", KEY)
    assert config_from_args(build_parser().parse_args(["serve"])).api_key == KEY
    monkeypatch.delenv("LIPSYNC_API_KEY")
    assert config_from_args(build_parser().parse_args(["serve"])).api_key is None
    with pytest.raises(ValueError, match="at least 16"):
        config_from_args(build_parser().parse_args(["serve", "--api-key", "short"]))


def test_without_a_key_the_server_warns_when_others_can_reach_it(
    monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    from signaling import server as server_module

    async def run(*_) -> int:
        return 0

    monkeypatch.setattr(server_module, "run", run)
    with caplog.at_level(logging.WARNING, logger="signaling.server"):
        server_module.serve(ServerConfig(offline=True, host="0.0.0.0"), engine=Animator())
    assert "without an API key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="signaling.server"):
        server_module.serve(ServerConfig(offline=True, host="127.0.0.1"), engine=Animator())
        server_module.serve(
            ServerConfig(offline=True, host="0.0.0.0", api_key=KEY), engine=Animator()
        )
    assert "without an API key" not in caplog.text


# -- hostile clients ---------------------------------------------------------------------


async def test_malformed_bodies_get_400_never_500(caplog: pytest.LogCaptureFixture) -> None:
    async with serving() as server, aiohttp.ClientSession() as http:
        url = server.make_url("/api/sessions")
        cases = [
            ("application/json", b"[" * 100_000, "bad_json"),
            ("application/json", b'{"a": ' * 20_000, "bad_json"),
            ("application/json; charset=klingon", b"{}", "bad_charset"),
            ("application/json; charset=latin-1", b"{}", "bad_charset"),
            ("application/json", b'{"sdp": "\xff\xfe"}', "bad_encoding"),
            ("application/json", b"\xc3\x28", "bad_encoding"),
            ("application/json", b"", "bad_json"),
        ]
        with caplog.at_level(logging.ERROR):
            for content_type, body, code in cases:
                async with http.post(
                    url, data=body, headers={"Content-Type": content_type}
                ) as response:
                    await _error(response, 400, code)
        assert caplog.records == []
        async with http.get(server.make_url("/api/health")) as response:
            assert response.status == 200


async def _raw(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def test_an_oversized_body_is_refused_before_it_is_read() -> None:
    async with serving() as server:
        for path, size in (("/api/sessions", 10**9), ("/api/avatars", 11 * 2**20)):
            reader, writer = await _raw(
                server.port,
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                f"{'application/json' if 'sessions' in path else 'image/png'}\r\n"
                f"Content-Length: {size}\r\n\r\n".encode(),
            )
            # Answered although no byte of the body was sent.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 413"), head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert b'"too_large"' in await reader.readexactly(length)
            writer.close()


async def test_a_client_that_hangs_up_is_not_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as server:
        with caplog.at_level(logging.INFO):
            for path, kind in (
                ("/api/sessions", "application/json"),
                ("/api/avatars", "image/png"),
            ):
                _, writer = await _raw(
                    server.port,
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: 5000\r\n\r\n{'x' * 100}".encode(),
                )
                await asyncio.sleep(0.2)
                writer.close()
                await asyncio.sleep(0.3)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        assert caplog.text.count("client went away") == 2


async def test_a_slow_body_gets_408() -> None:
    async with serving(request_timeout=1.0) as server:
        reader, writer = await _raw(
            server.port,
            b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        )
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(30):  # ten bytes a second
                writer.write(b" " * 10)
                await writer.drain()
                await asyncio.sleep(1.0)
                if reader.at_eof() or len(reader._buffer) > 0:
                    break
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 3


async def test_offers_with_more_media_than_a_session_uses_are_refused() -> None:
    pc, sdp = await _offer(audio_tracks=2)
    async with serving() as server, aiohttp.ClientSession() as http:
        async with http.post(
            server.make_url("/api/sessions"), json={"sdp": sdp, "type": "offer"}
        ) as response:
            error = await _error(response, 400, "bad_offer")
            assert "2 audio m-line" in error["message"]
        assert not server.app[SESSIONS].sessions
    await pc.close()


async def test_uploads_beyond_the_limit_wait_then_get_503(monkeypatch) -> None:
    """One upload slot, held by a client trickling its photo: the next upload waits, then is
    told when to retry; once the slot is free, uploads go through again."""
    from signaling import avatars

    monkeypatch.setattr(avatars, "UPLOAD_WAIT", 0.5)
    async with serving(max_concurrent_uploads=1) as server, aiohttp.ClientSession() as http:
        _, writer = await _raw(
            server.port,
            b"POST /api/avatars HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG",
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        async with http.post(
            server.make_url("/api/avatars"), data=_photo(), headers={"Content-Type": "image/png"}
        ) as response:
            await _error(response, 503, "busy")
            assert response.headers["Retry-After"].isdigit()
        assert 0.4 < time.monotonic() - started < 3
        writer.close()
        await asyncio.sleep(0.3)
        async with http.post(
            server.make_url("/api/avatars"), data=_photo(), headers={"Content-Type": "image/png"}
        ) as response:
            await _error(response, 422, "no_face")  # decoded: the slot was free again
