"""The browser page, end to end: Debian's Chromium, driven by Playwright, against the real server.

Chromium's fake capture device plays espeak speech as the microphone; the server runs the
weight-free Animator. Chromium may talk to 127.0.0.1 only: host names resolve nowhere else, and
every request the page makes to another host is refused and fails the test.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from signaling.config import ServerConfig
from tests.conftest import free_port
from tests.servers import serve_in_thread

playwright_sync = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LIVE_TIMEOUT_MS = 20_000
FPS_SECONDS = 3.0

# Frames presented over `seconds` of playback, from requestVideoFrameCallback's metadata (a
# callback can cover two frames when both land within one display refresh), and the decoded
# frames that getVideoPlaybackQuality counts over the same time.
MEASURE_FPS = """async (seconds) => {
  const video = document.querySelector('[data-testid="avatar-video"]');
  const frame = () => new Promise((resolve) =>
    video.requestVideoFrameCallback((now, meta) => resolve({now, meta})));
  const first = await frame();
  const decodedBefore = video.getVideoPlaybackQuality().totalVideoFrames;
  let last = first;
  while (last.now - first.now < seconds * 1000) last = await frame();
  const elapsed = (last.now - first.now) / 1000;
  const decoded = video.getVideoPlaybackQuality().totalVideoFrames - decodedBefore;
  return {fps: (last.meta.presentedFrames - first.meta.presentedFrames) / elapsed,
          decoded_fps: decoded / elapsed, elapsed,
          width: video.videoWidth, height: video.videoHeight};
}"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One session at most, so a second page meets a full server; an empty weights cache, so
    # faces are found with dlib whatever this machine has cached.
    config = ServerConfig(offline=True, max_sessions=1, cache=tmp_path_factory.mktemp("cache"))
    with serve_in_thread(config) as served:
        yield served.url


@pytest.fixture(scope="module")
def fake_microphone(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The speech with a second of silence around it, as 48 kHz 16-bit mono, the format
    Chromium's fake capture device plays (in a loop)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.fail("ffmpeg is not installed; scripts/test.sh installs it")
    path = tmp_path_factory.mktemp("mic") / "speech-48k.wav"
    filters = "adelay=1000:all=1,apad=pad_dur=1"
    subprocess.run(
        [ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(speech_wav), "-af", filters,
         "-ar", "48000", "-ac", "1", "-c:a", "pcm_s16le", "-y", str(path)],
        check=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def browser(fake_microphone: Path):
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; scripts/test.sh installs it")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-domain-reliability",
                "--no-first-run",
                "--no-pings",
                # Every host name resolves to nothing: only the 127.0.0.1 literal is reachable.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={fake_microphone}",
            ],
        )
        yield browser
        browser.close()


class PageWatch:
    """A page with what went wrong on it: script errors, console errors, foreign requests."""

    def __init__(self, browser, base_url: str) -> None:
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 800}, permissions=["microphone"]
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.console_errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on(
            "console",
            lambda message: (
                message.type == "error"
                and self.console_errors.append(f"{message.text} ({message.location.get('url')})")
            ),
        )
        self.context.route("**/*", self._only_local)
        self.page.goto(base_url)
        self.page.wait_for_selector("body[data-state=idle]")

    def _only_local(self, route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.foreign.append(route.request.url)
            route.abort()

    def by_id(self, test_id: str):
        return self.page.get_by_test_id(test_id)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser, base_url):
    pages: list[PageWatch] = []

    def open_() -> PageWatch:
        pages.append(PageWatch(browser, base_url))
        return pages[-1]

    yield open_
    for watch in pages:
        watch.close()


def _health(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/api/health", timeout=5) as response:
        return json.load(response)


def _wait_for_sessions(base_url: str, count: int, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = _health(base_url)
        if health["sessions"] == count or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_call_streams_the_avatar_at_25_fps(open_page, base_url, faces_dir: Path) -> None:
    watch = open_page()
    page = watch.page

    # The photo: uploaded, previewed with its face box, described.
    watch.by_id("avatar-file").set_input_files(faces_dir / "obama.jpg")
    page.wait_for_function(
        """() => {
          const img = document.querySelector('[data-testid="avatar-preview"]');
          return !img.src.includes('/default/') && img.complete && img.naturalWidth > 0;
        }"""
    )
    # The description follows once the picture has decoded.
    page.wait_for_function(
        """() => document.querySelector('[data-testid="photo-info"]')
                   .textContent.startsWith('Your photo')"""
    )
    assert "Your photo" in watch.by_id("photo-info").inner_text()
    assert "face found" in watch.by_id("photo-info").inner_text()

    watch.by_id("start").click()
    page.wait_for_selector("body[data-state=live]", timeout=LIVE_TIMEOUT_MS)
    assert _health(base_url)["sessions"] == 1
    assert watch.by_id("stop").is_visible() and not watch.by_id("start").is_visible()

    # The server's figures arrive (a second after the start, which the measurement skips).
    page.wait_for_function(
        """() => /^\\d+$/.test(document.querySelector('[data-testid="fig-fps"]').textContent)"""
    )
    measured = page.evaluate(MEASURE_FPS, FPS_SECONDS)
    print(f"page fps: {measured}")
    assert measured["fps"] >= 20, measured
    assert measured["width"] > 0 and measured["height"] > 0

    # The figures name the engine plainly.
    assert "built-in animator" in watch.by_id("fig-engine").inner_text()
    assert watch.by_id("speaking").is_visible()
    assert "Live" in watch.by_id("status").inner_text()
    # The speech reaches the server, which says so on the events channel.
    page.wait_for_selector("[data-testid=speaking][data-speaking=true]", timeout=5000)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    watch.by_id("stop").click()
    page.wait_for_selector("body[data-state=idle]")
    assert _wait_for_sessions(base_url, 0)["sessions"] == 0
    page.wait_for_function(
        """() => document.querySelector('[data-testid="status"]').textContent
                   .includes('Call ended')"""
    )
    assert watch.errors == [] and watch.console_errors == [], (watch.errors, watch.console_errors)
    assert watch.foreign == []


def test_a_photo_without_a_face_is_explained(open_page) -> None:
    watch = open_page()
    grey = io.BytesIO()
    Image.new("RGB", (480, 360), (128, 128, 128)).save(grey, "PNG")
    watch.by_id("avatar-file").set_input_files(
        {"name": "grey.png", "mimeType": "image/png", "buffer": grey.getvalue()}
    )
    status = watch.by_id("status")
    watch.page.wait_for_function(
        """() => document.querySelector('[data-testid="status"]').dataset.tone === 'error'"""
    )
    assert "No face found in this photo" in status.inner_text()
    # The built-in photo is still there to start with.
    assert watch.page.locator("body").get_attribute("data-state") == "idle"
    assert watch.by_id("start").is_enabled()
    assert watch.errors == [] and watch.foreign == []


def test_a_full_server_says_when_to_retry_and_leaving_frees_the_slot(open_page, base_url) -> None:
    first, second = open_page(), open_page()
    first.by_id("start").click()
    first.page.wait_for_selector("body[data-state=live]", timeout=LIVE_TIMEOUT_MS)

    second.by_id("start").click()
    second.page.wait_for_selector("body[data-state=failed]", timeout=LIVE_TIMEOUT_MS)
    text = second.by_id("status").inner_text()
    assert "server is full" in text and "Try again in 10 seconds" in text, text
    retry = second.by_id("retry")
    assert retry.is_visible() and retry.is_disabled() and "Retry in" in retry.inner_text()

    # Leaving the page ends its session (a keepalive DELETE on pagehide).
    first.page.goto("about:blank")
    assert _wait_for_sessions(base_url, 0)["sessions"] == 0
    assert first.errors == [] and second.errors == []
    assert first.foreign == [] and second.foreign == []


def test_with_an_api_key_the_page_works_from_a_token_link(browser, tmp_path: Path) -> None:
    """The operator's backend mints a token and hands out `/#token=...`: the page uses it for
    every call (the photo's preview included), keeps it out of the address bar, and without
    it says that an access link is needed."""
    key = "an operator key of 32 characters"
    config = ServerConfig(offline=True, max_sessions=1, cache=tmp_path, api_key=key)
    with serve_in_thread(config) as served:
        url = served.url
        request = urllib.request.Request(
            f"{url}/api/tokens", method="POST", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            link = json.load(response)["page"]

        context = browser.new_context(permissions=["microphone"])
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-state=failed]")
        assert "access link" in page.get_by_test_id("status").inner_text()
        context.close()

        watch = PageWatch(browser, url + link)
        page = watch.page
        assert page.evaluate("location.hash") == ""  # taken out of the address bar
        assert page.evaluate(
            "document.querySelector('[data-testid=avatar-preview]').src"
        ).startswith("blob:")
        watch.by_id("start").click()
        page.wait_for_selector("body[data-state=live]", timeout=LIVE_TIMEOUT_MS)
        page.reload()  # the token is kept for the tab
        page.wait_for_selector("body[data-state=idle]")
        assert _wait_for_sessions(url, 0)["sessions"] == 0  # the reload ended the call
        assert watch.errors == [] and watch.foreign == []
        watch.close()


# Every RTCPeerConnection the page makes is kept for inspection, and relays only: as a browser
# behind a firewall that lets no UDP through but to the TURN server would.
RELAY_ONLY = """
window.__pcs = [];
const Native = window.RTCPeerConnection;
window.RTCPeerConnection = function (config = {}) {
  const pc = new Native({ ...config, iceTransportPolicy: "relay" });
  window.__pcs.push(pc);
  return pc;
};
window.RTCPeerConnection.prototype = Native.prototype;
"""

SELECTED_PAIR = """async () => {
  const stats = await window.__pcs[0].getStats();
  const byId = new Map([...stats.values()].map((s) => [s.id, s]));
  const transport = [...stats.values()].find((s) => s.type === "transport");
  const pair = byId.get(transport.selectedCandidatePairId);
  return { local: byId.get(pair.localCandidateId).candidateType,
           remote: byId.get(pair.remoteCandidateId).candidateType };
}"""


def _start_relay_only(browser, url: str):
    """A page in a browser that may only relay, its call started: (its context, the page)."""
    context = browser.new_context(permissions=["microphone"])
    context.add_init_script(RELAY_ONLY)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("body[data-state=idle]")
    page.get_by_test_id("start").click()
    return context, page


def test_a_browser_that_can_only_relay_connects_through_turn(browser, tmp_path: Path) -> None:
    """Chromium with iceTransportPolicy "relay", through Debian's coturn: the page goes live,
    and getStats shows the media on a relay pair."""
    from tests.test_turn_policy import start_coturn

    secret = "relay-test-secret"
    options = [
        "--fingerprint",
        "--use-auth-secret",
        f"--static-auth-secret={secret}",
        "--realm=lipsync.test",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--allow-loopback-peers",
    ]  # fmt: skip - loopback only in this test, never deployed
    coturn_run = start_coturn(options, tmp_path)
    coturn = next(coturn_run)
    try:
        config = ServerConfig(
            offline=True,
            cache=tmp_path / "cache",
            ice_servers=(f"turn:127.0.0.1:{coturn.port}?transport=udp",),
            turn_secret=secret,
        )
        with serve_in_thread(config) as served:
            context, page = _start_relay_only(browser, served.url)
            page.wait_for_selector("body[data-state=live]", timeout=LIVE_TIMEOUT_MS)
            assert page.evaluate(SELECTED_PAIR)["local"] == "relay"
            context.close()
    finally:
        coturn_run.close()


@pytest.mark.parametrize(
    ("turn", "says"),
    [(None, "offers no TURN relay"), ("closed", "TURN relay could not be reached")],
)
def test_the_page_says_why_ice_failed(browser, tmp_path: Path, turn, says) -> None:
    """A browser that may only relay, and a server with no TURN server, or one nobody
    answers at: the page says which."""
    ice = {}
    if turn == "closed":
        ice = {"ice_servers": (f"turn:127.0.0.1:{free_port()}?transport=udp",),
               "turn_secret": "s"}  # fmt: skip
    config = ServerConfig(offline=True, cache=tmp_path / "cache", **ice)
    with serve_in_thread(config) as served:
        context, page = _start_relay_only(browser, served.url)
        page.wait_for_selector("body[data-state=failed]", timeout=60_000)
        status = page.get_by_test_id("status").inner_text()
        assert says in status, status
        context.close()
