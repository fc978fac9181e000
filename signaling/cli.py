"""The `lipsync` command: serve (one process, or a front door with workers), gateway, worker,
call a server, render and manage weights.

Argument parsing lives here and only here; each subcommand calls into the library.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from signaling.config import ServerConfig

# Where the API key and the cluster secret may come from instead of their flags, which a
# process list would show.
API_KEY_VARIABLE = "LIPSYNC_API_KEY"
SECRET_VARIABLE = "LIPSYNC_CLUSTER_SECRET"
CACHE_HELP = "weights cache folder (default: $LIPSYNC_CACHE or ~/.cache/lipsync)"
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
        alignment=args.alignment,
    )
    print(f"wrote {result.path}: {result.frames} frames at 25 fps, face box {result.box}")
    return 0


# Flags whose value goes to the ServerConfig field of the same name.
SAME_NAME = (
    "host", "port", "max_sessions", "video_bitrate", "turn_secret", "turn_ttl", "tls_cert",
    "tls_key", "offline", "checkpoint", "cache", "device", "trust_checkpoint", "token_ttl",
    "request_timeout", "max_concurrent_uploads", "peer_timeout", "min_fps", "shutdown_grace",
    "push_buffer", "alignment", "silence_db", "backend", "max_batch", "inference_threads",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The settings from a subcommand's flags (those it has; defaults for the rest), and the
    API key from its variable when not given as a flag."""
    from signaling.config import ServerConfig

    given = vars(args)
    fields: dict[str, Any] = {name: given[name] for name in SAME_NAME if name in given}
    if "video_size" in given:
        fields["video_max_width"], fields["video_max_height"] = args.video_size
    if "max_upload_mb" in given:
        fields["max_upload_bytes"] = int(args.max_upload_mb * 1024 * 1024)
    if "idle_timeout" in given:
        fields["session_idle_timeout"] = args.idle_timeout
    for flag, field in (("ice_server", "ice_servers"), ("allowed_origin", "allowed_origins"),
                        ("public_host", "public_hosts")):  # fmt: skip
        if flag in given:
            fields[field] = tuple(given[flag] or ())
    if "api_key" in given:
        fields["api_key"] = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    return ServerConfig(**fields)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def _cluster_secret(args: argparse.Namespace) -> str:
    secret = args.cluster_secret or os.environ.get(SECRET_VARIABLE)
    if not secret or len(secret) < 16:
        raise UsageError(
            f"a cluster secret of at least 16 characters is needed (--cluster-secret or "
            f"${SECRET_VARIABLE}), the same for gateways and workers: `openssl rand -hex 32`"
        )
    return secret


def _then_exit(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A server command's process ends as soon as its server has stopped: by then every
    session is closed and every request answered or cut off. Waiting for libraries' threads to
    wind down too (encoders, ONNX Runtime's pools) took it 1.7 s past the shutdown grace, which
    orchestrators enforce with SIGKILL."""

    def run(args: argparse.Namespace) -> int:
        code = command(args)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return run


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    _logging()
    if args.workers is None:
        from signaling.server import serve

        return serve(config, delay=args.delay)
    return _serve_workers(args, config)


def _serve_workers(args: argparse.Namespace, config: ServerConfig) -> int:
    """`serve --workers N`: the front door here, N worker processes on loopback behind it."""
    import asyncio
    import secrets

    from signaling.gateway import serve_local_workers, worker_command
    from signaling.runner import warn_if_open

    devices = local_devices(config, args.workers)
    threads = cpu_share(config, devices)
    own = ["--inference-threads", str(threads)] if threads is not None else []
    warn_if_open(config)
    ports = [free_port() for _ in devices]
    commands = [
        worker_command(
            [
                *media_flags(args),
                *own,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                device,
                "--worker-id",
                f"local-{i}",
            ]
        )
        for i, (port, device) in enumerate(zip(ports, devices))
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    secret = secrets.token_hex(32)
    env = {SECRET_VARIABLE: secret}  # not on the command line, where ps would show it
    return asyncio.run(serve_local_workers(config, commands, urls, secret, env))


def local_devices(config: ServerConfig, workers: int | None) -> list[str]:
    """The device of each worker `serve --workers` starts: as many as asked for, or as suit
    the machine. ONNX Runtime runs on the CPU: its workers neither spread over the GPUs nor
    count them."""
    from signaling.gateway import default_workers, worker_devices

    device = "cpu" if config.backend.startswith("onnxruntime") else config.device
    return worker_devices(workers or default_workers(device), device)


def cpu_share(config: ServerConfig, devices: list[str]) -> int | None:
    """Inference threads for each worker on `devices`, where they run on the CPU: the cores
    split between them. Each taking every core, N workers ran N times as many threads as there
    are cores, which waited on each other (two int8 sessions on two workers: 12.3-16.6 inferred
    fps each; 14.9 to 21.2 over three runs with a core each). None on GPUs, or when
    --inference-threads says."""
    from signaling.gateway import gpu_count

    if config.inference_threads is not None:
        return None  # passed on to every worker as given
    if gpu_count() and not all(device == "cpu" for device in devices):
        return None
    return max(1, (os.cpu_count() or 1) // len(devices))


def media_flags(args: argparse.Namespace) -> list[str]:
    """The media flags `serve` was given, for the workers it starts (not --device: each
    worker gets its own)."""
    out: list[str] = []
    for action in args.media_actions:
        value = getattr(args, action.dest)
        if value is None or value is False or action.dest == "device":
            continue
        flag = action.option_strings[0]
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [item for v in value for item in (flag, str(v))]
        elif action.dest == "video_size":
            out += [flag, "{}x{}".format(*value)]
        else:
            out += [flag, str(value)]
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gateway(args: argparse.Namespace) -> int:
    import asyncio

    from signaling.gateway import serve_gateway
    from signaling.runner import warn_if_open

    config = config_from_args(args)
    secret = _cluster_secret(args)
    _logging()
    warn_if_open(config)
    return asyncio.run(serve_gateway(config, args.redis, secret))


def _worker(args: argparse.Namespace) -> int:
    from signaling.server import build_worker, serve_worker

    config = config_from_args(args)
    secret = _cluster_secret(args)
    if args.redis and not args.advertise and config.host in ("0.0.0.0", "::", ""):
        raise UsageError(
            "--advertise URL is needed with --redis when listening on every address: the URL "
            "gateways reach this worker at, e.g. http://10.0.0.5:8081"
        )
    _logging()
    app = build_worker(
        config, secret, delay=args.delay, worker_id=args.worker_id, advertise=args.advertise
    )
    return serve_worker(app, config, args.redis, args.dead_after)


def _call(args: argparse.Namespace) -> int:
    """`lipsync call`: client/call.py, with a progress bar and the figures printed."""
    import asyncio

    from tqdm import tqdm

    from client.call import CallError, call

    token = args.token or os.environ.get(API_KEY_VARIABLE)
    with tqdm(
        total=1.0, unit="s", disable=args.quiet, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s"
    ) as bar:

        def progress(done: float, total: float) -> None:
            bar.total = round(total, 1)
            bar.n = round(done, 1)
            bar.refresh()

        try:
            result = asyncio.run(
                call(args.server, args.audio, face=args.face, output=args.output,
                     push=args.push, token=token, progress=progress)
            )  # fmt: skip
        except CallError as exc:
            raise UsageError(str(exc)) from None
    figures = result.figures
    print(f"session {result.session_id}: {result.frames} frames in {result.seconds:.1f} s")
    if figures:
        get = figures.get
        print(
            f"  delivered {get('delivered_fps')} fps, inferred {get('generated_fps')} fps, "
            f"lag {get('lag_ms')} ms (p95 {get('lag_p95_ms')}), engine {get('engine')}"
        )
    if result.output is not None:
        print(f"  wrote {result.output}")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 1280x720") from None
    return width, height


def _weights_fetch(args: argparse.Namespace) -> int:
    from wav2lip.weights import WeightsError, fetch

    try:
        path = fetch(args.name, cache=args.cache, mirrors=args.mirror, progress=not args.quiet)
    except WeightsError as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.name}: verified at {path}")
    return 0


def _weights_list(args: argparse.Namespace) -> int:
    from wav2lip.weights import cache_dir, list_models

    print(f"cache: {cache_dir(args.cache)}")
    for model in list_models(args.cache):
        print(f"{model.name:24} {model.size / 1e6:8.1f} MB  {model.state:9} {model.description}")
    return 0


def _add_common(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        help="stun:, turn: or turns: URL (repeatable); aiortc itself uses only the first STUN "
        "and the first TURN URL",
    )
    parser.add_argument("--turn-secret", help="coturn static-auth-secret for TURN credentials")
    parser.add_argument(
        "--turn-ttl",
        type=int,
        default=6 * 3600,
        help="TURN login lifetime (s); a session relayed through TURN cannot outlast it",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=15.0,
        help="seconds a client has for a request's headers, and again for its body",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds SIGTERM gives sessions and requests before the process exits",
    )


def _add_front_door(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="photo size limit")
    parser.add_argument(
        "--max-concurrent-uploads", type=int, default=4, help="photo uploads handled at once"
    )
    access = parser.add_argument_group("who may use the server")
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


def _add_media(parser: argparse.ArgumentParser) -> None:
    """The media side's flags; `serve --workers` passes the ones given on to its workers."""
    from signaling.config import BACKENDS

    media = parser.add_argument_group("the media side")
    actions = [
        media.add_argument("--max-sessions", type=int, default=4),
        media.add_argument(
            "--min-fps",
            type=float,
            default=20.0,
            help="refuse a new session unless every session could still get this many "
            "inferred frames a second, as the device was measured (0: only --max-sessions)",
        ),
        media.add_argument(
            "--peer-timeout",
            type=float,
            default=10.0,
            help="end a session after this many seconds without any packet from its peer",
        ),
        media.add_argument(
            "--idle-timeout",
            type=float,
            default=30.0,
            help="end a session after this many seconds without microphone media",
        ),
        media.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: the cache)"),
        media.add_argument("--cache", type=Path, help=CACHE_HELP),
        media.add_argument(
            "--offline", action="store_true", help="never download weights at start"
        ),
        media.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps"),
        media.add_argument(
            "--backend",
            choices=BACKENDS,
            default="auto",
            help="how Wav2Lip runs: auto (ONNX Runtime on a CPU, PyTorch on a GPU), torch, "
            "onnxruntime, or onnxruntime-int8 (quantized: faster on a CPU, not exact)",
        ),
        media.add_argument(
            "--max-batch",
            type=int,
            help="frames inferred together at most (default: 1 on a CPU, 2 with int8, 16 on a GPU)",
        ),
        media.add_argument(
            "--inference-threads",
            type=int,
            help="CPU threads inference uses (default: every core; with serve --workers N on a "
            "CPU, an Nth each)",
        ),
        media.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP),
        media.add_argument(
            "--video-size", type=_size, default=(1280, 720), help="largest video size (WxH)"
        ),
        media.add_argument("--video-bitrate", type=int, default=1_500_000, help="bits per second"),
        media.add_argument(
            "--delay",
            type=float,
            help="seconds from audio arrival to its frame (default: by engine)",
        ),
        media.add_argument(
            "--alignment",
            choices=("training", "official"),
            default="training",
            help="each frame's audio window: as Wav2Lip was trained (default), or as its "
            "official inference (40 ms earlier, 40 ms more delay)",
        ),
        media.add_argument(
            "--silence-db",
            type=float,
            default=-80.0,
            help="audio below this mel level (dB; digital silence is -100) shows the cached "
            "silent mouth, without inference",
        ),
        media.add_argument(
            "--push-buffer",
            type=float,
            default=60.0,
            help="seconds of pushed audio a session holds (a voice agent's TTS)",
        ),
    ]
    parser.set_defaults(media_actions=actions)


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-secret",
        help=f"shared by gateways and workers; also ${SECRET_VARIABLE} (better: not in ps)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipsync", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the real-time server")
    _add_common(serve, 8080)
    _add_front_door(serve)
    _add_media(serve)
    serve.add_argument(
        "--workers",
        type=int,
        nargs="?",
        const=0,
        metavar="N",
        help="run the media side in N worker processes behind this one (no N: as suits the "
        "machine); without the flag, everything runs in this process",
    )
    serve.set_defaults(run=_then_exit(_serve))

    gateway = commands.add_parser(
        "gateway", help="a front door for the media workers registered in Redis"
    )
    _add_common(gateway, 8080)
    _add_front_door(gateway)
    _add_cluster(gateway)
    gateway.add_argument("--redis", required=True, metavar="URL", help="redis://host:6379/0")
    gateway.set_defaults(run=_then_exit(_gateway))

    worker = commands.add_parser("worker", help="a media worker, for gateways to place on")
    _add_common(worker, 8081)
    _add_media(worker)
    _add_cluster(worker)
    worker.add_argument("--redis", metavar="URL", help="register in this Redis")
    worker.add_argument(
        "--advertise", metavar="URL", help="where gateways reach this worker's internal API"
    )
    worker.add_argument("--worker-id", help="this worker's name (default: host and port)")
    worker.add_argument(
        "--dead-after",
        type=float,
        default=5.0,
        help="seconds without a heartbeat (one a second) before gateways count it dead",
    )
    worker.set_defaults(run=_then_exit(_worker))

    call = commands.add_parser("call", help="call a server: stream an audio file, record the video")
    call.add_argument("--server", required=True, metavar="URL", help="http://127.0.0.1:8080")
    call.add_argument("--audio", type=Path, required=True, help="any audio PyAV can decode")
    call.add_argument("--face", type=Path, help="a photo to upload (default: the server's)")
    call.add_argument("-o", "--output", type=Path, help="record the video and audio to this MP4")
    call.add_argument(
        "--push", action="store_true", help="push the audio, as a voice agent does (not real time)"
    )
    call.add_argument("--token", help=f"the server's API key or a token; also ${API_KEY_VARIABLE}")
    call.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    call.set_defaults(run=_call)

    render = commands.add_parser("render", help="render a photo speaking an audio file to MP4")
    render.add_argument("--face", type=Path, required=True, help="photo of a face")
    render.add_argument("--audio", type=Path, required=True, help="any audio PyAV can decode")
    render.add_argument("-o", "--output", type=Path, required=True, help="output .mp4")
    render.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: the cache)")
    render.add_argument("--cache", type=Path, help=CACHE_HELP)
    render.add_argument("--box", type=_box, help="face box x1,y1,x2,y2 (skips detection)")
    render.add_argument("--blend", choices=("feather", "hard"), default="feather")
    render.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    render.add_argument("--batch-size", type=int, default=16)
    render.add_argument(
        "--alignment",
        choices=("training", "official"),
        default="training",
        help="each frame's audio window: as Wav2Lip was trained, or as its official inference",
    )
    render.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    render.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    render.set_defaults(run=_render)

    weights = commands.add_parser("weights", help="download and list model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser("fetch", help="download and verify a known model")
    fetch.add_argument("name", nargs="?", default="wav2lip_gan.pth")
    fetch.add_argument("--cache", type=Path, help=CACHE_HELP)
    fetch.add_argument(
        "--mirror",
        action="append",
        help="base URL to try first (repeatable; also $LIPSYNC_MIRRORS)",
    )
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(run=_weights_fetch)
    listing = weights_commands.add_parser("list", help="show known models and the cache")
    listing.add_argument("--cache", type=Path, help=CACHE_HELP)
    listing.set_defaults(run=_weights_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library's errors (bad checkpoint, no face, failed download) are ValueErrors or
    # OSErrors; they are not imported here, so that `gateway` never loads PyTorch.
    try:
        return int(args.run(args))
    except (UsageError, ValueError, OSError) as exc:
        print(f"lipsync: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
