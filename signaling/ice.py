"""STUN and TURN servers for ICE, for the browser and for the media workers' peer connections.

TURN logins are minted per request in coturn's REST scheme (`use-auth-secret` with
`static-auth-secret=SECRET`): the username is `"<expiry unix time>:<name>"` and the password
base64(HMAC-SHA1(SECRET, username)), so the TURN server checks them without a user database and
a leaked login expires on its own. STUN URLs get no credentials.

aiortc, unlike browsers, uses only the first STUN URL and the first TURN URL it is given (and
skips `turn:` with a transport other than udp or tcp, and `turns:` with one other than tcp); the
browser gets the whole list. With no servers configured the list is empty, and the server's peer
connections get an explicitly empty list: left unset, aiortc would fall back to Google's public
STUN server.

The front door imports this module, so it does not import aiortc: `rtc_configuration` imports
it when a worker asks for one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiortc import RTCConfiguration

    from signaling.config import ServerConfig

TURN_SCHEMES = ("turn", "turns")
SCHEMES = ("stun", *TURN_SCHEMES)
# The `<name>` part of minted TURN usernames; coturn logs it.
TURN_NAME = "lipsync"
# What aiortc (and RFC 7064/7065) accept: scheme:host[:port], and ?transport= on TURN only.
URL_FORMS = {
    "stun": re.compile(r"stun:[^:?\s]+(:[0-9]+)?", re.IGNORECASE),
    "turn": re.compile(r"turns?:[^:?\s]+(:[0-9]+)?(\?transport=[a-z]+)?", re.IGNORECASE),
}


def _scheme(url: str) -> str:
    return url.partition(":")[0].lower()


def check_ice_config(urls: Sequence[str], turn_secret: str | None) -> None:
    """Raise ValueError, naming the flag, if a URL is malformed or TURN lacks its secret."""
    for url in urls:
        if _scheme(url) not in SCHEMES:
            raise ValueError(f"--ice-server {url!r}: use a stun:, turn: or turns: URL")
        if not URL_FORMS[_scheme(url).rstrip("s")].fullmatch(url):
            raise ValueError(
                f"--ice-server {url!r} is malformed; expected e.g. "
                "stun:stun.example.org:3478 or turn:turn.example.org:3478?transport=udp"
            )
    has_turn = any(_scheme(url) in TURN_SCHEMES for url in urls)
    if has_turn and not turn_secret:
        raise ValueError("a turn: or turns: --ice-server needs --turn-secret (coturn's secret)")
    if turn_secret and not has_turn:
        raise ValueError("--turn-secret is given but no turn: or turns: --ice-server uses it")


def turn_credentials(
    secret: str, ttl: int, name: str = TURN_NAME, now: float | None = None
) -> tuple[str, str]:
    """A (username, credential) pair valid for `ttl` seconds from `now` (default: now)."""
    expiry = int((time.time() if now is None else now) + ttl)
    username = f"{expiry}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(
    config: ServerConfig, name: str = TURN_NAME, now: float | None = None
) -> list[dict[str, Any]]:
    """The servers as the browser's RTCIceServer dictionaries: STUN URLs in one entry, TURN URLs
    in another with freshly minted credentials."""
    stun = [url for url in config.ice_servers if _scheme(url) not in TURN_SCHEMES]
    turn = [url for url in config.ice_servers if _scheme(url) in TURN_SCHEMES]
    servers: list[dict[str, Any]] = []
    if stun:
        servers.append({"urls": stun})
    if turn and config.turn_secret:
        username, credential = turn_credentials(config.turn_secret, config.turn_ttl, name, now)
        servers.append({"urls": turn, "username": username, "credential": credential})
    return servers


def rtc_configuration(
    config: ServerConfig, name: str = TURN_NAME, now: float | None = None
) -> RTCConfiguration:
    """The same servers and fresh credentials for an aiortc RTCPeerConnection (never None:
    aiortc would then use a public STUN server)."""
    from aiortc import RTCConfiguration, RTCIceServer

    return RTCConfiguration(
        iceServers=[
            RTCIceServer(
                urls=server["urls"],
                username=server.get("username"),
                credential=server.get("credential"),
            )
            for server in ice_servers(config, name, now)
        ]
    )
