"""The page in Firefox ESR (Debian's firefox-esr, driven headless over Marionette), with its
default of hiding host addresses behind mDNS names: the server never learns an address from
the offer, and must wait for the browser's own connectivity checks to find it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rtc_server import manager
from signaling.config import ServerConfig
from tests.conftest import free_port
from tests.servers import serve_in_thread

pytestmark = pytest.mark.slow

FIREFOX = "firefox-esr"
# A fake microphone without a prompt; nothing reachable but 127.0.0.1 (every other request
# goes to a proxy that is not there); none of Firefox's own background traffic.
PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": 9,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": 9,
    "network.proxy.no_proxies_on": "127.0.0.1",
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "app.update.auto": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
}


@pytest.fixture(scope="module")
def firefox(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from marionette_driver.marionette import Marionette

    binary = shutil.which(FIREFOX)
    if binary is None:
        pytest.fail(f"{FIREFOX} is not installed; scripts/test.sh installs it")
    profile = tmp_path_factory.mktemp("firefox-profile")
    port = free_port()
    prefs = {**PREFS, "marionette.port": port}
    lines = []
    for name, value in prefs.items():
        literal = str(value).lower() if isinstance(value, bool) else repr(value)
        lines.append(f'user_pref("{name}", {literal.replace(chr(39), chr(34))});')
    (profile / "user.js").write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [binary, "--marionette", "--headless", "--no-remote", "--profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = Marionette(host="127.0.0.1", port=port, startup_timeout=60)
        client.start_session()
        yield client
        client.delete_session()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait(client, script: str, timeout: float = 30) -> object:
    from marionette_driver import Wait

    return Wait(client, timeout=timeout, interval=0.2).until(lambda m: m.execute_script(script))


def test_firefox_with_hidden_addresses_connects_without_turn(
    firefox, tmp_path: Path, monkeypatch
) -> None:
    offers: list[str] = []
    real = manager.for_ice

    def spy(sdp: str) -> str:
        offers.append(sdp)
        return real(sdp)

    monkeypatch.setattr(manager, "for_ice", spy)
    config = ServerConfig(offline=True, cache=tmp_path / "cache")
    with serve_in_thread(config) as served:
        firefox.navigate(served.url)
        _wait(firefox, "return document.body.dataset.state === 'idle'")
        firefox.execute_script("document.querySelector('[data-testid=start]').click()")
        _wait(firefox, "return document.body.dataset.state === 'live'", timeout=40)
        # The video plays, and the server's figures arrive on the events channel.
        _wait(
            firefox,
            "const v = document.querySelector('[data-testid=avatar-video]');"
            "return v.currentTime > 1 && v.videoWidth > 0",
        )
        version = firefox.session_capabilities["browserVersion"]
        firefox.execute_script("document.querySelector('[data-testid=stop]').click()")
        _wait(firefox, "return document.body.dataset.state === 'idle'")
    # Every host candidate of the offer was an mDNS name: no address came with it.
    (offer,) = offers
    candidates = [line for line in offer.splitlines() if line.startswith("a=candidate:")]
    assert candidates and all(".local " in line for line in candidates), candidates
    print(f"Firefox {version}: live with only mDNS candidates offered")
