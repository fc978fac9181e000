"""Checkpoint download and cache, against a local HTTP server that can resume, cut the
connection, ignore Range, fail, or serve wrong bytes. Nothing here leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from wav2lip import weights
from wav2lip.weights import ModelSpec, WeightsError

PAYLOAD = random.Random(0).randbytes(300_000)
SPEC = ModelSpec(
    name="tiny.pth",
    description="a small stand-in checkpoint",
    size=len(PAYLOAD),
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
)
REGISTRY = {SPEC.name: SPEC}


@dataclass
class Mirror:
    """How one mirror (a path prefix on the test server) behaves."""

    status: int = 200
    corrupt: bool = False
    ignore_range: bool = False
    cut_after: int | None = None
    body: bytes = PAYLOAD


@dataclass
class Server:
    """The test server's settings and what it was asked for."""

    port: int
    mirrors: dict[str, Mirror] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def mirror(self, prefix: str, **behaviour: Any) -> str:
        """Add a mirror and return its base URL."""
        self.mirrors[prefix] = Mirror(**behaviour)
        return f"http://127.0.0.1:{self.port}/{prefix}"


class Handler(BaseHTTPRequestHandler):
    """Serves `/<prefix>/<file>` as `Mirror` `prefix` says, with single-range requests."""

    state: Server

    def do_GET(self) -> None:
        self.state.requests.append((self.path, self.headers.get("Range")))
        mirror = self.state.mirrors.get(self.path.split("/")[1])
        if mirror is None or mirror.status != 200:
            self.send_error(mirror.status if mirror else 404)
            return
        body = bytes(b ^ 0xFF for b in mirror.body) if mirror.corrupt else mirror.body
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not mirror.ignore_range:
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body) if mirror.cut_after is None else start + mirror.cut_after
        self.wfile.write(body[start:end])
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest output clean."""


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Server(port=httpd.server_address[1])
    httpd.RequestHandlerClass = type("BoundHandler", (Handler,), {"state": state})
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_env_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own LIPSYNC_MIRRORS must not leak into the tests."""
    monkeypatch.delenv("LIPSYNC_MIRRORS", raising=False)
    monkeypatch.delenv("LIPSYNC_CACHE", raising=False)


def closed_port_url() -> str:
    """A base URL nobody listens on: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}/gone"


def fetch(cache: Path, *mirrors: str, progress: bool = False) -> Path:
    return weights.fetch(
        SPEC.name, cache=cache, mirrors=list(mirrors), progress=progress, registry=REGISTRY
    )


def test_whole_download(server: Server, tmp_path: Path) -> None:
    path = fetch(tmp_path, server.mirror("m"))
    assert path == tmp_path / SPEC.name
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [(f"/m/{SPEC.name}", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SPEC.name, f"{SPEC.name}.sha256"]


def test_resumes_a_cut_download_with_range(server: Server, tmp_path: Path) -> None:
    base = server.mirror("m", cut_after=100_000)
    with pytest.raises(WeightsError, match="connection closed after 100000 of 300000 bytes"):
        fetch(tmp_path, base)
    part = tmp_path / f"{SPEC.name}.part"
    assert part.read_bytes() == PAYLOAD[:100_000]
    assert not (tmp_path / SPEC.name).exists()

    server.mirrors["m"].cut_after = None
    path = fetch(tmp_path, base)
    assert server.requests[-1] == (f"/m/{SPEC.name}", "bytes=100000-")
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()
    assert weights.find_cached(SPEC.name, tmp_path, registry=REGISTRY) == path


def test_server_ignoring_range_starts_over(server: Server, tmp_path: Path) -> None:
    # A stale prefix of wrong bytes: kept and appended to, it would fail the hash.
    (tmp_path / f"{SPEC.name}.part").write_bytes(b"x" * 1000)
    path = fetch(tmp_path, server.mirror("m", ignore_range=True))
    assert server.requests == [(f"/m/{SPEC.name}", "bytes=1000-")]
    assert path.read_bytes() == PAYLOAD


def test_complete_part_is_finished_without_request(server: Server, tmp_path: Path) -> None:
    (tmp_path / f"{SPEC.name}.part").write_bytes(PAYLOAD)
    path = fetch(tmp_path, server.mirror("m"))
    assert server.requests == []
    assert path.read_bytes() == PAYLOAD


def test_corrupt_download_is_reported_and_not_kept(server: Server, tmp_path: Path) -> None:
    base = server.mirror("m", corrupt=True)
    with pytest.raises(WeightsError) as info:
        fetch(tmp_path, base)
    actual = hashlib.sha256(bytes(b ^ 0xFF for b in PAYLOAD)).hexdigest()
    assert f"sha256 is {actual}, expected {SPEC.sha256}" in str(info.value)
    assert base in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_file_is_replaced(server: Server, tmp_path: Path) -> None:
    (tmp_path / SPEC.name).write_bytes(bytes(len(PAYLOAD)))
    path = fetch(tmp_path, server.mirror("m"))
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [{"status": 500}, {"corrupt": True}, {"body": b"<html>not found</html>"}, "refused"],
    ids=["http-500", "bad-hash", "wrong-size", "refused"],
)
def test_falls_back_to_next_mirror(
    server: Server, tmp_path: Path, failure: dict[str, Any] | str
) -> None:
    bad = closed_port_url() if failure == "refused" else server.mirror("bad", **failure)
    path = fetch(tmp_path, bad, server.mirror("good"))
    assert path.read_bytes() == PAYLOAD
    assert server.requests[-1] == (f"/good/{SPEC.name}", None)


def test_error_lists_every_mirror(server: Server, tmp_path: Path) -> None:
    refused, broken = closed_port_url(), server.mirror("broken", status=503)
    corrupt = server.mirror("corrupt", corrupt=True)
    with pytest.raises(WeightsError) as info:
        fetch(tmp_path, refused, broken, corrupt)
    lines = str(info.value).splitlines()
    assert lines[0] == f"could not download {SPEC.name} into {tmp_path}:"
    assert lines[1].startswith(f"  {refused}/{SPEC.name}: ") and "refused" in lines[1]
    assert lines[2] == f"  {broken}/{SPEC.name}: HTTP 503 Service Unavailable"
    assert lines[3].startswith(f"  {corrupt}/{SPEC.name}: sha256 is ")


def test_cached_file_returns_without_any_request(server: Server, tmp_path: Path) -> None:
    base = server.mirror("m")
    first = fetch(tmp_path, base)
    server.requests.clear()
    assert fetch(tmp_path, base) == first
    assert fetch(tmp_path, closed_port_url()) == first
    assert server.requests == []


def test_verified_marker_spares_the_rehash(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fetch(tmp_path, server.mirror("m"))
    assert SPEC.sha256 in (tmp_path / f"{SPEC.name}.sha256").read_text()

    def no_hashing(_: Path) -> str:
        raise AssertionError("hashed a file whose verification was recorded")

    monkeypatch.setattr(weights, "_sha256", no_hashing)
    assert weights.find_cached(SPEC.name, tmp_path, registry=REGISTRY) == path
    assert [s.state for s in weights.list_models(tmp_path, registry=REGISTRY)] == ["verified"]


def test_changed_file_is_verified_again(server: Server, tmp_path: Path) -> None:
    path = fetch(tmp_path, server.mirror("m"))
    path.write_bytes(bytes(len(PAYLOAD)))  # same size, new mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert weights.find_cached(SPEC.name, tmp_path, registry=REGISTRY) is None
    assert [s.state for s in weights.list_models(tmp_path, registry=REGISTRY)] == ["corrupt"]


def test_list_reports_each_state(server: Server, tmp_path: Path) -> None:
    registry = {
        name: ModelSpec(name, f"{name} model", SPEC.size, SPEC.sha256)
        for name in ("a.pth", "b.pth", "c.pth", "d.pth")
    }
    weights.fetch("a.pth", tmp_path, [server.mirror("m")], False, registry)
    (tmp_path / "b.pth.part").write_bytes(PAYLOAD[:10])
    (tmp_path / "c.pth").write_bytes(PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1]))
    statuses = weights.list_models(tmp_path, registry=registry)
    assert [(s.name, s.state, s.path) for s in statuses] == [
        ("a.pth", "verified", tmp_path / "a.pth"),
        ("b.pth", "partial", tmp_path / "b.pth.part"),
        ("c.pth", "corrupt", tmp_path / "c.pth"),
        ("d.pth", "missing", None),
    ]
    assert statuses[0].description == "a.pth model" and statuses[0].size == SPEC.size


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        WeightsError, match=re.escape("unknown model 'nope.pth'; known models: tiny.pth")
    ):
        weights.fetch("nope.pth", tmp_path, registry=REGISTRY)
    with pytest.raises(
        WeightsError, match=re.escape("wav2lip.pth, wav2lip_gan.pth, s3fd-619a316812.pth")
    ):
        weights.find_cached("nope.pth", tmp_path)


def test_progress_bar_goes_to_stderr_only_when_asked(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = server.mirror("m")
    fetch(tmp_path / "quiet", base, progress=False)
    assert capsys.readouterr() == ("", "")
    fetch(tmp_path / "loud", base, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and SPEC.name in err and "100%" in err


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "lipsync"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "lipsync"
    monkeypatch.setenv("LIPSYNC_CACHE", str(tmp_path / "env"))
    assert weights.cache_dir() == tmp_path / "env"
    assert weights.cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_lipsync_cache_env_is_used_by_fetch(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIPSYNC_CACHE", str(tmp_path / "env-cache"))
    path = weights.fetch(SPEC.name, mirrors=[server.mirror("m")], progress=False, registry=REGISTRY)
    assert path == tmp_path / "env-cache" / SPEC.name
    assert weights.list_models(registry=REGISTRY)[0].state == "verified"


def test_mirror_order_argument_then_env_then_defaults(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ModelSpec(SPEC.name, "", SPEC.size, SPEC.sha256, urls=("https://example.invalid/x",))
    monkeypatch.setenv("LIPSYNC_MIRRORS", " http://b/  http://c ")
    assert weights.mirror_urls(spec, ["http://a/"]) == [
        f"http://a/{SPEC.name}",
        f"http://b/{SPEC.name}",
        f"http://c/{SPEC.name}",
        "https://example.invalid/x",
    ]
    monkeypatch.setenv("LIPSYNC_MIRRORS", server.mirror("env"))
    registry = {SPEC.name: ModelSpec(SPEC.name, "", SPEC.size, SPEC.sha256, (closed_port_url(),))}
    weights.fetch(SPEC.name, tmp_path, progress=False, registry=registry)
    assert server.requests == [(f"/env/{SPEC.name}", None)]


def test_shipped_toml_lists_the_three_checkpoints() -> None:
    registry = weights.load_registry()
    assert {name: (s.size, s.sha256) for name, s in registry.items()} == {
        "wav2lip.pth": (
            435807851,
            "b78b681b68ad9fe6c6fb1debc6ff43ad05834a8af8a62ffc4167b7b34ef63c37",
        ),
        "wav2lip_gan.pth": (
            435801865,
            "ca9ab7b7b812c0e80a6e70a5977c545a1e8a365a6c49d5e533023c034d7ac3d8",
        ),
        "s3fd-619a316812.pth": (
            89843225,
            "619a31681264d3f7f7fc7a16a42cbbe8b23f31a256f75a366e5a1bcd59b33543",
        ),
    }
    hf = "https://huggingface.co/camenduru/Wav2Lip/resolve/main/checkpoints/"
    assert registry["wav2lip.pth"].urls[0] == hf + "wav2lip.pth"
    assert registry["wav2lip_gan.pth"].urls[0] == hf + "wav2lip_gan.pth"
    assert registry["s3fd-619a316812.pth"].urls[0] == (
        "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"
    )
    assert all(s.description for s in registry.values())
