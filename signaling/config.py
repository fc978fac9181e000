"""The server's settings, one frozen object that the CLI fills from its flags.

Frozen so that every part of the server sees the same values for its whole life; checked on
creation so a mistake is reported at startup, naming the flag, not on the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

from signaling.guard import normal_host_name, normal_origin
from signaling.ice import check_ice_config

# An API key shorter than this could be guessed.
MIN_KEY_LENGTH = 16
# How Wav2Lip may run: "auto" and wav2lip.engine.BACKENDS, named here so that a gateway never
# loads PyTorch to check a flag (a test keeps the two lists the same).
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-int8")
# The most frames one batch may hold (CUDA graphs are recorded for each power of two up to it).
MAX_BATCH = 64


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
    # TURN logins' lifetime: a session relayed through TURN cannot outlast its login.
    turn_ttl: int = 6 * 3600
    # A session that receives no media for this many seconds is closed.
    session_idle_timeout: float = 30.0
    avatar_limit: int = 32
    tls_cert: Path | None = None
    tls_key: Path | None = None
    offline: bool = False
    checkpoint: Path | None = None
    cache: Path | None = None
    device: str = "auto"
    # How Wav2Lip runs: "auto" (ONNX Runtime on a CPU, PyTorch on a GPU), "torch",
    # "onnxruntime", or "onnxruntime-int8" (quantized: faster on a CPU, not exact).
    backend: str = "auto"
    # Frames inferred together at most; None: the engine's own (1 on a CPU, 2 with int8, 16 on
    # a GPU).
    max_batch: int | None = None
    # CPU threads inference uses; None: every core (`serve --workers N` on a CPU gives each of
    # its workers an Nth).
    inference_threads: int | None = None
    # TorchScript checkpoints run code from the file: loaded only when the user trusts it.
    trust_checkpoint: bool = False
    # -- who may call, and from where (signaling/guard.py, signaling/auth.py) -----------------
    # Origins (scheme://host[:port]) besides the server's own whose pages may use the API.
    allowed_origins: tuple[str, ...] = ()
    # Host names the server answers to, besides localhost and its own addresses.
    public_hosts: tuple[str, ...] = ()
    # With a key, every /api/ route but health needs it or a token minted with it.
    api_key: str | None = None
    token_ttl: int = 600
    # -- hostile clients --------------------------------------------------------------------
    # Seconds a client has to send a request's headers (from connecting, or from the previous
    # response), and then its body.
    request_timeout: float = 15.0
    # Photo uploads received and decoded at once; more wait briefly, then get 503.
    max_concurrent_uploads: int = 4
    # -- the media side ---------------------------------------------------------------------
    # A peer from which nothing has arrived for this long has vanished: its session ends.
    peer_timeout: float = 10.0
    # A new session is refused unless every session could still get this many inferred
    # frames a second on the device, as measured.
    min_fps: float = 20.0
    # Seconds that SIGTERM gives sessions and requests before the process exits.
    shutdown_grace: float = 10.0
    # Seconds of pushed audio (a voice agent's) a session holds before refusing more.
    push_buffer: float = 60.0
    # Which audio window each video frame gets: "training" (as Wav2Lip was trained) or
    # "official" (as its inference.py, 40 ms earlier).
    alignment: Literal["training", "official"] = "training"
    # Frames whose audio is below this level throughout (dB on Wav2Lip's mel scale, where
    # digital silence is -100) show the session's cached silent mouth, without inference.
    silence_db: float = -80.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ice_servers", tuple(self.ice_servers))
        object.__setattr__(
            self, "allowed_origins", tuple(normal_origin(o) for o in self.allowed_origins)
        )
        object.__setattr__(
            self, "public_hosts", tuple(normal_host_name(h) for h in self.public_hosts)
        )
        positive = {
            "--max-sessions": self.max_sessions,
            "--max-upload-bytes": self.max_upload_bytes,
            "--max-pixels": self.max_pixels,
            "--video-bitrate": self.video_bitrate,
            "--turn-ttl": self.turn_ttl,
            "--session-idle-timeout": self.session_idle_timeout,
            "--avatar-limit": self.avatar_limit,
            "--token-ttl": self.token_ttl,
            "--request-timeout": self.request_timeout,
            "--max-concurrent-uploads": self.max_concurrent_uploads,
            "--peer-timeout": self.peer_timeout,
            "--shutdown-grace": self.shutdown_grace,
            "--push-buffer": self.push_buffer,
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
        if not -100 <= self.silence_db <= 0:
            raise ValueError(f"--silence-db must be -100 to 0, got {self.silence_db}")
        if self.alignment not in ("training", "official"):
            raise ValueError(
                f'--alignment must be "training" or "official", not {self.alignment!r}'
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}"
            )
        if self.backend.startswith("onnxruntime") and self.device not in ("auto", "cpu"):
            raise ValueError(
                f"--backend {self.backend} runs on the CPU: it cannot go with "
                f"--device {self.device}"
            )
        if self.inference_threads is not None and self.inference_threads < 1:
            raise ValueError(
                f"--inference-threads must be at least 1, got {self.inference_threads}"
            )
        if self.max_batch is not None and not 1 <= self.max_batch <= MAX_BATCH:
            raise ValueError(f"--max-batch must be 1 to {MAX_BATCH}, got {self.max_batch}")
        if self.min_fps < 0 or self.min_fps > 25:
            raise ValueError(f"--min-fps must be 0 to 25 (the video's rate), got {self.min_fps}")
        if self.api_key is not None and len(self.api_key) < MIN_KEY_LENGTH:
            raise ValueError(
                f"the API key must have at least {MIN_KEY_LENGTH} characters; make one with "
                "`openssl rand -hex 32`"
            )
        check_ice_config(self.ice_servers, self.turn_secret)


# The application's config, for handlers: `request.app[CONFIG]`.
CONFIG = web.AppKey("config", ServerConfig)
