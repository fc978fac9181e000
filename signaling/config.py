"""The server's settings, one frozen object that the CLI fills from its flags.

Frozen so that every part of the server sees the same values for its whole life; checked on
creation so a mistake is reported at startup, naming the flag, not on the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from signaling.ice import check_ice_config


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    max_upload_bytes: int = 10 * 1024 * 1024
    # Photos above this are refused before decoding: 40 MP is already 120 MB of pixels.
    max_pixels: int = 40_000_000
    video_max_width: int = 1280
    video_max_height: int = 720
    video_bitrate: int = 1_500_000
    # stun:, turn: and turns: URLs, offered to browsers and used by the server's own peers.
    ice_servers: tuple[str, ...] = ()
    # Shared secret of a coturn server (`static-auth-secret`) for time-limited TURN logins.
    turn_secret: str | None = None
    turn_ttl: int = 24 * 3600
    # A session that receives no media for this many seconds is closed.
    session_idle_timeout: float = 30.0
    avatar_limit: int = 32
    tls_cert: Path | None = None
    tls_key: Path | None = None
    offline: bool = False
    checkpoint: Path | None = None
    cache: Path | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ice_servers", tuple(self.ice_servers))
        positive = {
            "--max-sessions": self.max_sessions,
            "--max-upload-bytes": self.max_upload_bytes,
            "--max-pixels": self.max_pixels,
            "--video-bitrate": self.video_bitrate,
            "--turn-ttl": self.turn_ttl,
            "--session-idle-timeout": self.session_idle_timeout,
            "--avatar-limit": self.avatar_limit,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0 to 65535 (0: any free port), got {self.port}")
        if min(self.video_max_width, self.video_max_height) < 64:
            raise ValueError("the video size must be at least 64x64 pixels")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        check_ice_config(self.ice_servers, self.turn_secret)


# The application's config, for handlers: `request.app[CONFIG]`.
CONFIG = web.AppKey("config", ServerConfig)
