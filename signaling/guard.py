"""Which pages may use the server: the Host they asked for, and the Origin they come from.

Two attacks by other web sites are stopped here, before any handler runs:

- DNS rebinding. A page on evil.example points its own name at this server and then reads the
  API as if it were same-origin. Its requests still say `Host: evil.example`, so only the names
  the server serves are answered: localhost, the names given with `--public-host`, the address
  it listens on, and the address the client connected to. An address typed as such cannot be
  rebound, because the page's origin would then be the server itself.
- Cross-site requests. Any page may make a browser POST to any server (a form, or a fetch with
  a "simple" content type, which needs no preflight). Browsers send `Origin` with each such
  request, so a state-changing request from an origin that is neither the server's own nor one
  given with `--allowed-origin` gets 403. Requests without `Origin` come from programs, not
  pages; authentication is their check.

CORS headers and preflight answers go to allowed origins only, so an operator's own site can
call the API while other pages can neither pass a preflight nor read an answer.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from yarl import URL

from signaling.errors import error_response

if TYPE_CHECKING:
    from signaling.config import ServerConfig

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}
CORS_EXPOSED = "Location, Retry-After, Link"


def normal_origin(origin: str) -> str:
    """`origin` as browsers send it: `scheme://host[:port]`, lower case, no default port.
    ValueError names what is wrong, for `--allowed-origin`."""
    parts = urlsplit(origin.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or port == -1
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(f"--allowed-origin {origin!r}: use scheme://host[:port], e.g. "
                         "https://app.example.com")  # fmt: skip
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def normal_host_name(name: str) -> str:
    """A host name or address for `--public-host`, lower case and without IPv6 brackets."""
    bare = name.strip().lower().removeprefix("[").removesuffix("]")
    if not bare or any(c in bare for c in "/@ ") or (":" in bare and not _is_address(bare)):
        raise ValueError(f"--public-host {name!r}: give a host name or address, without a port")
    return bare


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_port(authority: str) -> tuple[str, int | None] | None:
    """The host (lower case, no brackets) and explicit port of a Host header; None if bad."""
    try:
        url = URL(f"http://{authority}")
    except ValueError:
        return None
    if url.raw_host is None or url.raw_path not in ("", "/") or url.user is not None:
        return None
    return url.raw_host.lower().strip("[]"), url.explicit_port


def _origin_parts(origin: str) -> tuple[str, int] | None:
    """(host, port) of an Origin header; None for `null` or anything malformed."""
    try:
        normal = normal_origin(origin)
    except ValueError:
        return None
    parts = urlsplit(normal)
    assert parts.hostname is not None
    return parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


class Guard:
    """The Host and Origin rules of one server, as an aiohttp middleware."""

    def __init__(self, config: ServerConfig) -> None:
        served = [*LOOPBACK_NAMES, *config.public_hosts]
        if config.host not in WILDCARD_ADDRESSES:
            served.append(normal_host_name(config.host))
        self._hosts = frozenset(served)
        self._public = frozenset(config.public_hosts)
        self._allowed = frozenset(config.allowed_origins)

    def serves(self, request: web.Request) -> bool:
        """Whether the request's Host is one of this server's names or addresses."""
        header = request.headers.get(hdrs.HOST)
        if header is None:  # HTTP/1.0: nothing to rebind
            return True
        parsed = _host_port(header)
        if parsed is None:
            return False
        host = parsed[0]
        if host in self._hosts:
            return True
        transport = request.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        return local is not None and _is_address(host) and host == str(local[0]).lower()

    def is_own_origin(self, request: web.Request, origin: str) -> bool:
        """An origin of this server: its Host (same name and port), or a `--public-host` name
        on any port (behind a proxy the Host header may be the proxy's upstream)."""
        parts = _origin_parts(origin)
        if parts is None:
            return False
        host, port = parts
        if host in self._public:
            return True
        own = _host_port(request.headers.get(hdrs.HOST, ""))
        if own is None or own[0] != host:
            return False
        # A Host without a port means the scheme's default port, whichever the client used.
        return own[1] == port or (own[1] is None and port in DEFAULT_PORTS.values())

    def is_allowed_origin(self, origin: str) -> bool:
        """An origin the operator named with `--allowed-origin`: it gets CORS headers."""
        try:
            return normal_origin(origin) in self._allowed
        except ValueError:
            return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.serves(request):
            return error_response(
                421,
                "unknown_host",
                f"this server does not answer to the host {request.headers.get(hdrs.HOST)!r}; "
                "its operator can add the name with --public-host",
            )
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:  # not a page: a program, which authentication checks
            return await handler(request)
        cross = self.is_allowed_origin(origin)
        if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            if not cross:
                return error_response(
                    403, "forbidden_origin", f"cross-origin requests from {origin} are not allowed"
                )
            return web.Response(status=204, headers=_cors(origin, CORS_HEADERS))
        if (
            request.method not in SAFE_METHODS
            and not cross
            and not self.is_own_origin(request, origin)
        ):
            return error_response(
                403,
                "forbidden_origin",
                f"pages from {origin} may not use this server; its operator can allow them "
                "with --allowed-origin",
            )
        response = await handler(request)
        if cross:
            response.headers.update(_cors(origin, {"Access-Control-Expose-Headers": CORS_EXPOSED}))
        return response


def _cors(origin: str, extra: dict[str, str]) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **extra}
