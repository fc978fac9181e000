"""The HTTP API's avatar, health and error handling, against a real server on 127.0.0.1."""

from __future__ import annotations

import io
import logging
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import FormData, MultipartWriter
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image, ImageFile

from rtc_server.avatars import PhotoError, fit_video
from signaling import sessions
from signaling.config import ServerConfig
from signaling.server import build_app
from signaling.worker_api import WORKER
from wav2lip.animator import Animator

# Tests of the shared server run on its loop.
shared_server = pytest.mark.asyncio(loop_scope="module")

PHOTOS = {
    "obama.jpg": "image/jpeg",
    "biden.jpg": "image/jpeg",
    "lin-manuel-miranda.png": "image/png",
    "two_people.jpg": "image/jpeg",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory):
    # An empty weights cache: faces are found with dlib, whatever this machine has cached.
    config = ServerConfig(offline=True, cache=tmp_path_factory.mktemp("cache"))
    app = build_app(config, engine=Animator())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


def png_bytes(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` RGB, followed by one row of pixels only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


async def expect_error(response, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == code
    assert len(error["message"]) > 20
    return error["message"]


def check_avatar(info: dict) -> None:
    width, height = info["width"], info["height"]
    assert 0 < width <= 1280 and 0 < height <= 720
    assert width % 2 == 0 and height % 2 == 0
    x1, y1, x2, y2 = info["face"]["box"]
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    # A real face: a sizeable part of the frame, roughly as tall as wide.
    assert 0.01 < (x2 - x1) * (y2 - y1) / (width * height) < 0.7
    assert 0.7 < (y2 - y1) / (x2 - x1) < 1.8


async def check_preview(client: TestClient, info: dict) -> None:
    response = await client.get(f"/api/avatars/{info['id']}/preview")
    assert response.status == 200
    assert response.content_type == "image/jpeg"
    preview = Image.open(io.BytesIO(await response.read()))
    assert preview.format == "JPEG"
    assert preview.size == (info["width"], info["height"])


@shared_server
@pytest.mark.parametrize("name", PHOTOS)
async def test_upload_raw_body(client: TestClient, faces_dir: Path, name: str) -> None:
    data = (faces_dir / name).read_bytes()
    response = await client.post("/api/avatars", data=data, headers={"Content-Type": PHOTOS[name]})
    assert response.status == 201, await response.text()
    info = await response.json()
    check_avatar(info)
    photo_width, photo_height = Image.open(faces_dir / name).size
    assert abs(info["width"] / info["height"] - photo_width / photo_height) < 0.02
    assert response.headers["Location"] == f"/api/avatars/{info['id']}"
    again = await client.get(f"/api/avatars/{info['id']}")
    assert again.status == 200 and await again.json() == info
    await check_preview(client, info)

    # The worker that analysed it holds the photo as sessions need it.
    avatar = client.app[WORKER].avatars.get(info["id"])
    assert avatar is not None
    assert avatar.image.shape == (info["height"], info["width"], 3)
    assert avatar.image.dtype == np.uint8 and not avatar.image.flags.writeable
    assert avatar.face_input.shape == (6, 96, 96) and avatar.face_input.dtype == np.float32


@shared_server
async def test_upload_multipart_matches_raw(client: TestClient, faces_dir: Path) -> None:
    data = (faces_dir / "obama.jpg").read_bytes()
    form = FormData()
    form.add_field("note", "ignored")
    form.add_field("image", data, filename="obama.jpg", content_type="image/jpeg")
    response = await client.post("/api/avatars", data=form)
    assert response.status == 201, await response.text()
    info = await response.json()
    check_avatar(info)
    raw = await client.post("/api/avatars", data=data, headers={"Content-Type": "image/jpeg"})
    assert await raw.json() == info  # the same photo: the same avatar, stored once
    await check_preview(client, info)

    # A part without a file name, as `curl -F "image=<photo.jpg"` sends it.
    form = MultipartWriter("form-data")
    form.append(data, {"Content-Type": "image/jpeg"}).set_content_disposition(
        "form-data", name="image"
    )
    response = await client.post("/api/avatars", data=form)
    assert response.status == 201, await response.text()


@shared_server
async def test_type_comes_from_the_bytes(client: TestClient, faces_dir: Path) -> None:
    """WebP is accepted, and a PNG labelled as JPEG is still read as what it is."""
    photo = Image.open(faces_dir / "lin-manuel-miranda.png").convert("RGB")
    webp = await client.post(
        "/api/avatars", data=png_bytes(photo, "WEBP"), headers={"Content-Type": "image/webp"}
    )
    assert webp.status == 201, await webp.text()
    mislabelled = await client.post(
        "/api/avatars", data=png_bytes(photo), headers={"Content-Type": "image/jpeg"}
    )
    assert mislabelled.status == 201, await mislabelled.text()
    check_avatar(await mislabelled.json())
    # A file the browser has no type for arrives as application/octet-stream.
    untyped = await client.post(
        "/api/avatars", data=png_bytes(photo), headers={"Content-Type": "application/octet-stream"}
    )
    assert untyped.status == 201, await untyped.text()


@shared_server
async def test_exif_orientation_is_applied(client: TestClient, faces_dir: Path) -> None:
    """A phone photo stored sideways with an EXIF orientation comes out upright."""
    upright = Image.open(faces_dir / "obama.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=90)
    response = await client.post("/api/avatars", data=data, headers={"Content-Type": "image/jpeg"})
    assert response.status == 201, await response.text()
    info = await response.json()
    assert info["height"] == 720 and info["width"] < info["height"]
    check_avatar(info)


@shared_server
async def test_too_large_is_refused_quickly(client: TestClient) -> None:
    body = b"\xff\xd8\xff" + bytes(11 * 2**20)
    start = time.monotonic()
    response = await client.post("/api/avatars", data=body, headers={"Content-Type": "image/jpeg"})
    assert "10 MB" in await expect_error(response, 413, "too_large")
    assert time.monotonic() - start < 2

    async def chunks():  # no Content-Length: refused once the limit is passed
        for _ in range(11):
            yield bytes(2**20)

    response = await client.post(
        "/api/avatars", data=chunks(), headers={"Content-Type": "image/png"}
    )
    await expect_error(response, 413, "too_large")

    form = FormData()
    form.add_field("image", body, filename="big.jpg", content_type="image/jpeg")
    await expect_error(await client.post("/api/avatars", data=form), 413, "too_large")


@shared_server
async def test_not_an_image(client: TestClient) -> None:
    response = await client.post(
        "/api/avatars", data=b"hello", headers={"Content-Type": "text/plain"}
    )
    assert "image/jpeg" in await expect_error(response, 415, "unsupported_type")
    response = await client.post(
        "/api/avatars",
        data=b"\xff\xd8\xff" + b"garbage" * 100,
        headers={"Content-Type": "image/jpeg"},
    )
    await expect_error(response, 415, "not_an_image")
    gif = png_bytes(Image.new("RGB", (200, 200), "grey"), "GIF")
    response = await client.post("/api/avatars", data=gif, headers={"Content-Type": "image/png"})
    await expect_error(response, 415, "not_an_image")
    form = FormData({"image": "not a file"}, default_to_multipart=True)
    await expect_error(await client.post("/api/avatars", data=form), 415, "not_an_image")
    form = FormData({"photo": "wrong field"}, default_to_multipart=True)
    await expect_error(await client.post("/api/avatars", data=form), 400, "missing_image")


@shared_server
async def test_no_face(client: TestClient) -> None:
    grey = png_bytes(Image.new("RGB", (640, 480), (128, 128, 128)))
    response = await client.post("/api/avatars", data=grey, headers={"Content-Type": "image/png"})
    assert "face" in await expect_error(response, 422, "no_face")
    tiny = png_bytes(Image.new("RGB", (30, 30), (128, 128, 128)))
    response = await client.post("/api/avatars", data=tiny, headers={"Content-Type": "image/png"})
    await expect_error(response, 422, "image_too_small")


@shared_server
@pytest.mark.parametrize("size", [(8000, 6000), (50000, 50000)])
async def test_decompression_bomb_is_never_decoded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    """48 MP passes Pillow's own limit but not the server's; 2.5 GP trips Pillow's too."""

    def refuse(self):
        raise AssertionError("the pixels of a decompression bomb were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    data = header_only_png(*size)
    assert len(data) < 1_000_000
    response = await client.post("/api/avatars", data=data, headers={"Content-Type": "image/png"})
    assert "megapixels" in await expect_error(response, 400, "too_many_pixels")


@shared_server
async def test_default_avatar(client: TestClient) -> None:
    response = await client.get("/api/avatars/default")
    assert response.status == 200
    info = await response.json()
    assert (info["id"], info["width"], info["height"]) == ("default", 512, 512)
    check_avatar(info)
    await check_preview(client, info)


@shared_server
async def test_unknown_avatar(client: TestClient) -> None:
    await expect_error(await client.get("/api/avatars/nope"), 404, "avatar_not_found")
    await expect_error(await client.get("/api/avatars/nope/preview"), 404, "avatar_not_found")


@shared_server
async def test_unknown_paths_and_methods(client: TestClient) -> None:
    await expect_error(await client.get("/api/nothing/here"), 404, "not_found")
    response = await client.delete("/api/avatars")
    await expect_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    await expect_error(await client.put("/api/health"), 405, "method_not_allowed")


@shared_server
async def test_still_healthy_after_bad_requests(client: TestClient) -> None:
    response = await client.get("/api/health")
    assert response.status == 200
    health = await response.json()
    assert health["status"] == "ok"
    assert (health["engine"], health["sessions"]) == ("animator", 0)
    (worker,) = health["workers"]
    assert worker["server_ice"] == {"stun": None, "turn": None}


def test_fit_video_scales_down_only_to_even_sizes() -> None:
    odd = np.zeros((301, 201, 3), np.uint8)
    assert fit_video(odd, 1280, 720).shape == (300, 200, 3)
    wide = np.zeros((1080, 1920, 3), np.uint8)
    assert fit_video(wide, 1280, 720).shape == (720, 1280, 3)
    tall = np.zeros((3001, 1000, 3), np.uint8)
    assert fit_video(tall, 1280, 720).shape == (720, 240, 3)
    with pytest.raises(PhotoError, match="at least 64 pixels"):
        fit_video(np.zeros((5000, 100, 3), np.uint8), 1280, 720)


async def test_a_bug_is_a_json_500_and_the_oldest_avatars_go(
    faces_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """A bug in a handler is logged and answered as JSON, never taking the server down; and
    beyond the avatar limit the least recently used photo goes."""

    async def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sessions, "place", broken)
    config = ServerConfig(offline=True, cache=tmp_path, avatar_limit=2)
    async with TestClient(TestServer(build_app(config, engine=Animator()))) as client:
        with caplog.at_level(logging.ERROR, logger="signaling.errors"):
            response = await client.post("/api/sessions", json={"sdp": "v=0", "type": "offer"})
            await expect_error(response, 500, "internal")
        assert "a bug" in caplog.text

        ids = []
        for name in ("lin-manuel-miranda.png", "obama.jpg", "biden.jpg"):
            response = await client.post(
                "/api/avatars",
                data=(faces_dir / name).read_bytes(),
                headers={"Content-Type": PHOTOS[name]},
            )
            ids.append((await response.json())["id"])
            if len(ids) == 2:
                assert (await client.get(f"/api/avatars/{ids[0]}")).status == 200  # most recent now
        statuses = [(await client.get(f"/api/avatars/{i}")).status for i in ids]
        assert statuses == [200, 404, 200]
        assert (await client.get("/api/avatars/default")).status == 200
        assert (await (await client.get("/api/health")).json())["avatars"] == 2
