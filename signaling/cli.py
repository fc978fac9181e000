"""The `lipsync` command: serve, render and manage weights.

Argument parsing lives here and only here; each subcommand calls into the library.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from signaling.config import ServerConfig

# Where the API key may come from instead of --api-key, which a process list would show.
API_KEY_VARIABLE = "LIPSYNC_API_KEY"
TRUST_HELP = (
    "load TorchScript checkpoints (.pt archives), which run code from the file: only for a "
    "file you trust"
)


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        x1, y1, x2, y2 = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected four integers: x1,y1,x2,y2") from None
    if x2 <= x1 or y2 <= y1:
        raise argparse.ArgumentTypeError("need x1 < x2 and y1 < y2")
    return x1, y1, x2, y2


def _render(args: argparse.Namespace) -> int:
    from wav2lip.blend import first_face_row
    from wav2lip.checkpoint import load_checkpoint
    from wav2lip.engine import Engine
    from wav2lip.faces import FaceBox
    from wav2lip.render import render
    from wav2lip.weights import DETECTOR, find_cached, find_generator

    for label, path in (("photo", args.face), ("audio", args.audio)):
        if not path.is_file():
            raise UsageError(f"{label} not found: {path}")
    checkpoint = args.checkpoint or find_generator(args.cache)
    if checkpoint is None:
        raise UsageError(
            "no Wav2Lip checkpoint: pass --checkpoint PATH or run `lipsync weights fetch`"
        )
    engine = Engine(
        load_checkpoint(checkpoint, trust_code=args.trust_checkpoint),
        device=args.device,
        first_row=first_face_row(args.blend),
    )
    result = render(
        args.face,
        args.audio,
        args.output,
        engine,
        box=FaceBox(*args.box) if args.box else None,
        s3fd_path=find_cached(DETECTOR, args.cache),
        blend=args.blend,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(f"wrote {result.path}: {result.frames} frames at 25 fps, face box {result.box}")
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server's settings from `lipsync serve`'s flags (and the API key's variable)."""
    from signaling.config import ServerConfig

    width, height = args.video_size
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        video_max_width=width,
        video_max_height=height,
        video_bitrate=args.video_bitrate,
        ice_servers=tuple(args.ice_server or ()),
        turn_secret=args.turn_secret,
        turn_ttl=args.turn_ttl,
        session_idle_timeout=args.idle_timeout,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        offline=args.offline,
        checkpoint=args.checkpoint,
        cache=args.cache,
        device=args.device,
        trust_checkpoint=args.trust_checkpoint,
        allowed_origins=tuple(args.allowed_origin or ()),
        public_hosts=tuple(args.public_host or ()),
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        token_ttl=args.token_ttl,
        request_timeout=args.request_timeout,
        max_concurrent_uploads=args.max_concurrent_uploads,
        peer_timeout=args.peer_timeout,
        min_fps=args.min_fps,
        shutdown_grace=args.shutdown_grace,
    )


def _serve(args: argparse.Namespace) -> int:
    import logging

    from signaling.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return serve(config_from_args(args), delay=args.delay)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 1280x720") from None
    return width, height


def _weights_fetch(args: argparse.Namespace) -> int:
    from wav2lip.weights import fetch

    path = fetch(args.name, cache=args.cache, mirrors=args.mirror, progress=not args.quiet)
    print(f"{args.name}: verified at {path}")
    return 0


def _weights_list(args: argparse.Namespace) -> int:
    from wav2lip.weights import cache_dir, list_models

    print(f"cache: {cache_dir(args.cache)}")
    for model in list_models(args.cache):
        print(f"{model.name:24} {model.size / 1e6:8.1f} MB  {model.state:9} {model.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    cache_help = "weights cache folder (default: $LIPSYNC_CACHE or ~/.cache/lipsync)"

    serve = commands.add_parser("serve", help="run the real-time server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--max-sessions", type=int, default=4)
    serve.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: the cache)")
    serve.add_argument("--cache", type=Path, help=cache_help)
    serve.add_argument("--offline", action="store_true", help="never download weights at start")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    serve.add_argument(
        "--video-size", type=_size, default=(1280, 720), help="largest video size (WxH)"
    )
    serve.add_argument("--video-bitrate", type=int, default=1_500_000, help="bits per second")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="photo size limit")
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=30.0,
        help="end a session after this many seconds without microphone media",
    )
    serve.add_argument(
        "--delay", type=float, help="seconds from audio arrival to its frame (default: by engine)"
    )
    serve.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        help="stun:, turn: or turns: URL (repeatable); aiortc itself uses only the first STUN "
        "and the first TURN URL",
    )
    serve.add_argument("--turn-secret", help="coturn static-auth-secret for TURN credentials")
    serve.add_argument(
        "--turn-ttl",
        type=int,
        default=6 * 3600,
        help="TURN login lifetime (s); a session relayed through TURN cannot outlast it",
    )
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    serve.add_argument("--tls-key", type=Path, help="the certificate's private key")
    serve.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    access = serve.add_argument_group("who may use the server")
    access.add_argument(
        "--api-key",
        help=f"require this key (or a token minted with it) on the API; also ${API_KEY_VARIABLE}",
    )
    access.add_argument("--token-ttl", type=int, default=600, help="minted tokens' lifetime (s)")
    access.add_argument(
        "--allowed-origin",
        action="append",
        metavar="ORIGIN",
        help="another site (https://app.example.com) whose pages may call the API (repeatable)",
    )
    access.add_argument(
        "--public-host",
        action="append",
        metavar="NAME",
        help="a host name the server is reached by, besides localhost and its addresses "
        "(repeatable)",
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=15.0,
        help="seconds a client has for a request's headers, and again for its body",
    )
    limits.add_argument(
        "--max-concurrent-uploads", type=int, default=4, help="photo uploads handled at once"
    )
    limits.add_argument(
        "--peer-timeout",
        type=float,
        default=10.0,
        help="end a session after this many seconds without any packet from its peer",
    )
    limits.add_argument(
        "--min-fps",
        type=float,
        default=20.0,
        help="refuse a new session unless every session could still get this many inferred "
        "frames a second, as the device was measured (0: only --max-sessions)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds SIGTERM gives sessions and requests before the process exits",
    )
    serve.set_defaults(run=_serve)

    render = commands.add_parser("render", help="render a photo speaking an audio file to MP4")
    render.add_argument("--face", type=Path, required=True, help="photo of a face")
    render.add_argument("--audio", type=Path, required=True, help="any audio PyAV can decode")
    render.add_argument("-o", "--output", type=Path, required=True, help="output .mp4")
    render.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: the cache)")
    render.add_argument("--cache", type=Path, help=cache_help)
    render.add_argument("--box", type=_box, help="face box x1,y1,x2,y2 (skips detection)")
    render.add_argument("--blend", choices=("feather", "hard"), default="feather")
    render.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    render.add_argument("--batch-size", type=int, default=16)
    render.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    render.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    render.set_defaults(run=_render)

    weights = commands.add_parser("weights", help="download and list model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser("fetch", help="download and verify a known model")
    fetch.add_argument("name", nargs="?", default="wav2lip_gan.pth")
    fetch.add_argument("--cache", type=Path, help=cache_help)
    fetch.add_argument(
        "--mirror",
        action="append",
        help="base URL to try first (repeatable; also $LIPSYNC_MIRRORS)",
    )
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(run=_weights_fetch)
    listing = weights_commands.add_parser("list", help="show known models and the cache")
    listing.add_argument("--cache", type=Path, help=cache_help)
    listing.set_defaults(run=_weights_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wav2lip.checkpoint import CheckpointError
    from wav2lip.faces import NoFaceError
    from wav2lip.weights import WeightsError

    try:
        return int(args.run(args))
    except (UsageError, CheckpointError, NoFaceError, WeightsError, ValueError, OSError) as exc:
        print(f"lipsync: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
