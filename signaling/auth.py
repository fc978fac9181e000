"""Who may use the API: the operator's key, and short-lived tokens minted with it.

Without a key (the default, for local use) the API is open, like a desktop tool's. With
`--api-key`, every /api/ route but health, WHIP and WHEP need `Authorization: Bearer <key or
token>`, and /metrics the key itself (Prometheus sends it as a bearer token). The
operator's own backend calls `POST /api/tokens` with the key and hands the token to one caller,
for example as a link to the page, `/#token=...`, so the key itself never reaches a browser.

A token is signed, not stored: HMAC-SHA256 over its expiry and scopes, with a signing key
derived from the API key, so every server that has the key can check it and nothing has to be
shared or remembered. Signatures and keys are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from signaling.bodies import read_json_object
from signaling.config import CONFIG
from signaling.errors import ApiError, error_response

TOKEN_PREFIX = "lst1"
SCOPES = ("avatars", "sessions")
MAX_TOKEN_TTL = 24 * 3600
# What each route needs when a key is set: a scope (a token must carry it), ANY (any valid
# token), OPEN (nothing), or, for every route not listed, the key itself.
ANY, OPEN = "any", "open"
NEEDS: dict[tuple[str, str], str] = {
    ("GET", "/api/health"): OPEN,
    ("GET", "/api/avatars/{avatar_id}"): ANY,
    ("GET", "/api/avatars/{avatar_id}/preview"): ANY,
    ("POST", "/api/avatars"): "avatars",
    ("GET", "/api/ice-servers"): "sessions",
    ("POST", "/api/sessions"): "sessions",
    ("DELETE", "/api/sessions/{session_id}"): "sessions",
    ("POST", "/whip"): "sessions",
    ("POST", "/whip/{name}"): "sessions",
    ("DELETE", "/whip/{name}"): "sessions",
    ("POST", "/whep/{session_id}"): "sessions",
    ("DELETE", "/whep/{session_id}/{viewer_id}"): "sessions",
}
# Where credentials are checked: the JSON API, WHIP and WHEP, and the metrics.
GUARDED = ("/api/", "/whip", "/whep", "/metrics")
TOKEN_SHAPE = '{"ttl"?: seconds, "scope"?: ["avatars", "sessions"]}'

routes = web.RouteTableDef()


class TokenError(Exception):
    """A token that is not valid now; `code` says why (bad_token or token_expired)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Caller:
    """What the request's credentials allow: everything (the key) or a token's scopes."""

    is_operator: bool
    scopes: frozenset[str]

    def may(self, need: str) -> bool:
        return self.is_operator or need == ANY or need in self.scopes


def _signing_key(api_key: str) -> bytes:
    return hmac.new(api_key.encode(), b"lipsync token signing key", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_token(
    api_key: str, ttl: int, scopes: tuple[str, ...] = SCOPES, now: float | None = None
) -> str:
    """A token valid for `ttl` seconds from `now` for the given scopes."""
    claims = {
        "exp": int((time.time() if now is None else now) + ttl),
        "scope": sorted(set(scopes)),
        "id": secrets.token_hex(8),  # tells tokens minted in the same second apart in logs
    }
    payload = f"{TOKEN_PREFIX}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
    signature = hmac.new(_signing_key(api_key), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def check_token(api_key: str, token: str, now: float | None = None) -> frozenset[str]:
    """The scopes of a valid token; TokenError if it is forged, malformed or expired."""
    payload, _, signature = token.rpartition(".")
    expected = hmac.new(_signing_key(api_key), payload.encode(), hashlib.sha256).digest()
    try:
        given = _unb64(signature)
    except (binascii.Error, ValueError):
        given = b""
    if not payload.startswith(f"{TOKEN_PREFIX}.") or not hmac.compare_digest(given, expected):
        raise TokenError("bad_token", "the token is not one this server issued")
    claims = json.loads(_unb64(payload.removeprefix(f"{TOKEN_PREFIX}.")))
    if claims["exp"] <= (time.time() if now is None else now):
        raise TokenError("token_expired", "the token has expired; ask for a new one")
    return frozenset(claims["scope"])


def identify(api_key: str, authorization: str | None) -> Caller:
    """The caller behind an Authorization header; TokenError if there is none valid."""
    scheme, _, credential = (authorization or "").partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise TokenError("unauthorized", "send Authorization: Bearer <API key or token>")
    if hmac.compare_digest(credential.encode(), api_key.encode()):
        return Caller(is_operator=True, scopes=frozenset(SCOPES))
    return Caller(is_operator=False, scopes=check_token(api_key, credential))


def needs(request: web.Request) -> str:
    """What the request's route needs when a key is set (HEAD needs what GET needs). An
    unknown path needs the key, so that it tells a stranger nothing."""
    method = "GET" if request.method == "HEAD" else request.method
    resource = request.match_info.route.resource
    if resource is None:
        return "key"
    return NEEDS.get((method, resource.canonical), "key")


def auth_middleware(api_key: str) -> Middleware:
    """Checks every /api/ request's credentials against what its route needs."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        need = needs(request) if request.path.startswith(GUARDED) else OPEN
        if need == OPEN or request.method == "OPTIONS":
            return await handler(request)
        try:
            caller = identify(api_key, request.headers.get(hdrs.AUTHORIZATION))
        except TokenError as exc:
            return error_response(
                401,
                exc.code,
                str(exc),
                headers={"WWW-Authenticate": f'Bearer realm="lipsync", error="{exc.code}"'},
            )
        if not caller.may(need):
            message = (
                "this needs the API key itself"
                if need == "key"
                else f"the token does not allow this (it needs the {need!r} scope)"
            )
            return error_response(403, "insufficient_scope", message)
        return await handler(request)

    return authenticate


@routes.post("/api/tokens")
async def create_token(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if config.api_key is None:
        raise ApiError(
            404, "no_api_key", "tokens are only used when the server has an API key (--api-key)"
        )
    body: dict[str, Any] = {}
    if request.content_length or request.body_exists:
        body = await read_json_object(request, config.request_timeout, TOKEN_SHAPE)
    ttl = body.get("ttl", config.token_ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TOKEN_TTL:
        raise ApiError(400, "bad_ttl", f'"ttl" must be whole seconds, 1 to {MAX_TOKEN_TTL}')
    scopes = body.get("scope", list(SCOPES))
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise ApiError(400, "bad_scope", f'"scope" must be a non-empty list from {list(SCOPES)}')
    token = mint_token(config.api_key, ttl, tuple(scopes))
    return web.json_response(
        {
            "token": token,
            "expires_in": ttl,
            "scope": sorted(set(scopes)),
            "page": f"/#token={token}",
        },
        status=201,
        headers={"Cache-Control": "no-store"},
    )
