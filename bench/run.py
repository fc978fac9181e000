"""The benchmark: the engine against the plain PyTorch forward, and live sessions end to end.

    python -m bench.run [--checkpoint PATH] [--sessions 1 2] [--seconds 20]
    python -m bench.run --device cuda --batch 16 --sessions 8 16 32 --peer-processes 4

Everything is measured in one run on one machine, and written with the machine and the date to
bench/results/latest.json and bench/results/latest.md (the docs quote the latter). Without a
checkpoint, random weights in the official layout are used: speed does not depend on the values.

1. Engine: frames per second of the plain forward (the official model as loaded, batch 1 and
   the engine's batch) and of the engine (BatchNorm folded, face features cached, only the rows
   the feathered blend shows), and the largest difference between the two in the picture.
   On the CPU the engine runs with each backend: PyTorch, ONNX Runtime (fp32, the CPU default)
   and ONNX Runtime int8 (an option: faster, not exact). On CUDA: fp32 and fp16, each with and
   without CUDA graphs, at several batch sizes.
2. Sessions: a `lipsync serve` process and N real aiortc peers on loopback streaming espeak-ng
   speech in real time (spread over several processes so that their decoding does not limit
   the count); per session the delivered fps (at the peer), the generated fps (frames really
   inferred, from the server's stats) and the fresh fps (those and, in silence, the cached
   silent mouth), the age of the mouth shown (p50 and p95: the lag), the longest run of
   repeated frames, and at the peer, from each onset of speech it sends to the onset of the
   audio it gets back; the server's CPU use, split by thread (event loop, inference,
   compositing, encoders), and the GPU's utilisation where there is one: what limits the
   count. `--silence-share 0.5` makes the peers alternate speech and silence, as a
   conversation does. `--peers-skip-video-decoding` has the peers count video frames without
   decoding them, as if their decoding ran on another machine (on 2 cores here it saved
   little: the peers' RTP, SRTP and Opus cost more than decoding the pictures).
   `--backend` and `--max-batch` go to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp
import av
import numpy as np
import torch
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import VIDEO_TIME_BASE

from client.peer import LipSyncPeer
from tests.conftest import free_port, random_wav2lip
from tests.measure import speech_to_return, time_audio_packets
from wav2lip.audio import load_audio
from wav2lip.blend import Blender, first_face_row
from wav2lip.checkpoint import load_checkpoint
from wav2lip.engine import BACKENDS, Engine
from wav2lip.faces import find_face, model_input, read_image

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT.parent / "shared" / "testdata" / "faces" / "obama.jpg"
RESULTS = ROOT / "bench" / "results"
GPU_BATCHES = [1, 4, 16, 32, 64]
ROUNDS = 10  # each engine and the plain forward, timed in turn
PAUSE = 0.2  # seconds between timed runs
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine(device: str) -> dict[str, object]:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    found: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device == "cuda":
        found["gpu"] = torch.cuda.get_device_name()
        found["cuda"] = torch.version.cuda
    return found


def _per_frame(run, frames: int, repeats: int = 5) -> float:
    """Seconds per frame of `run` (which must wait for its result), best of `repeats` after a
    warm-up."""
    return _interleaved({"run": (run, frames)}, repeats)["run"]


def _interleaved(runs: dict[str, tuple], rounds: int) -> dict[str, float]:
    """Seconds per frame of each `(run, frames)`, best of `rounds` taken in turn: a machine
    that slows down for a while (noisy neighbours, clock changes) slows them all alike, so
    their ratios hold. A pause before each run lets the previous one's threads (PyTorch's
    spin as they wait for more work) leave the cores."""
    for run, _ in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (run, frames) in runs.items():
            time.sleep(PAUSE)
            start = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - start) / frames)
    return best


def _variants(device: str) -> dict[str, dict[str, object]]:
    """The engine configurations compared on a device."""
    if device == "cpu":
        return {backend: {"backend": backend} for backend in BACKENDS}
    return {
        f"{precision}{'-graphs' if graphs else ''}": {"half": half, "cuda_graphs": graphs}
        for precision, half in (("fp32", False), ("fp16", True))
        for graphs in (False, True)
    }


@torch.inference_mode()
def bench_engine(
    checkpoint: Path, photo: Path, device: str, batch: int, batches: list[int]
) -> dict[str, object]:
    model = load_checkpoint(checkpoint).to(device)
    image = read_image(photo)
    box = find_face(image)
    face = model_input(image, box)
    rng = np.random.default_rng(0)
    mels = rng.uniform(-4, 4, (max([batch, *batches]), 80, 16)).astype(np.float32)
    mel_t = torch.from_numpy(mels[:, None]).to(device)
    faces_t = torch.from_numpy(face[None]).to(device).expand(len(mels), -1, -1, -1).contiguous()

    def plain(count: int) -> torch.Tensor:
        return model(mel_t[:count], faces_t[:count]).cpu()

    plain_out = (plain(batch).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    blender = Blender(box, image.shape)
    shown_plain = [blender.paste(image, mouth).astype(int) for mouth in plain_out]
    engines = {
        name: Engine(model, device=device, first_row=first_face_row("feather"), **options)
        for name, options in _variants(device).items()
    }
    prepared = {name: engine.prepare(face) for name, engine in engines.items()}
    runs = {
        name: (functools.partial(engine.infer, prepared[name], mels[:batch]), batch)
        for name, engine in engines.items()
    }
    runs["plain"] = (lambda: plain(1), 1)
    if batch > 1:
        runs["plain_batch"] = (lambda: plain(batch), batch)
    seconds = _interleaved(runs, ROUNDS)
    plain_1 = seconds["plain"]
    report: dict[str, object] = {
        "device": device,
        "batch": batch,
        "plain_ms_per_frame_batch1": round(plain_1 * 1000, 2),
    }
    if batch > 1:
        report[f"plain_ms_per_frame_batch{batch}"] = round(seconds["plain_batch"] * 1000, 2)
    # Each configuration's difference is in what is shown: both pasted into the photo with the
    # feathered blend.
    for name, engine in engines.items():
        run = runs[name][0]
        shown = [blender.paste(image, mouth) for mouth in run()]
        diff = max(int(np.abs(a - b).max()) for a, b in zip(shown_plain, shown))
        report[f"engine_{name}_ms_per_frame"] = round(seconds[name] * 1000, 2)
        report[f"engine_{name}_fps"] = round(1 / seconds[name])
        report[f"engine_{name}_speedup_vs_plain_batch1"] = round(plain_1 / seconds[name], 2)
        report[f"engine_{name}_max_difference_shown"] = diff
        for count in batches:
            if count != batch:
                run = functools.partial(engine.infer, prepared[name], mels[:count])
                report[f"engine_{name}_ms_per_frame_batch{count}"] = round(
                    _per_frame(run, count) * 1000, 3
                )
    return report


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process so far, by thread name with digits folded ("asyncio_#")."""
    totals: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = re.sub(r"\d+", "#", text[text.index("(") + 1 : text.rindex(")")])
        fields = text.rsplit(")", 1)[1].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def _gpu_utilisation() -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        return float(out.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def _summary(
    peer: LipSyncPeer, first_video: int, first_event: int, speech_to_return: list[float]
) -> dict[str, object]:
    """One peer's figures over the measured window (from the given record counts on)."""
    times = np.array([t for t, _, _ in peer.received.video[first_video:]])
    stats = [e for e in peer.received.events[first_event:] if e["type"] == "stats"]
    lag50 = [s["lag_ms"] for s in stats if s["lag_ms"] is not None]
    lag95 = [s["lag_p95_ms"] for s in stats if s["lag_p95_ms"] is not None]
    generated = [s["generated_fps"] for s in stats]
    fresh = [s["generated_fps"] + s.get("silent_fps", 0) for s in stats]
    return {
        "delivered_fps": round((len(times) - 1) / (times[-1] - times[0]), 1),
        "generated_fps": round(float(np.mean(generated)), 1),
        "generated_fps_by_second": generated,
        "fresh_fps": round(float(np.mean(fresh)), 1),
        "delay_ms_by_second": [s.get("delay_ms") for s in stats],
        "jitter_ms_by_second": [s.get("jitter_ms") for s in stats],
        "speech_to_return_ms": [round(1000 * d) for d in speech_to_return],
        # None: no fresh mouth was shown in the window, only the resting face.
        "lag_p50_ms": round(float(np.median(lag50))) if lag50 else None,
        "lag_p95_ms": round(float(np.percentile(lag95, 95))) if lag95 else None,
        "dropped_total": stats[-1]["dropped"],
        "longest_repeat_run": stats[-1]["longest_repeat_run"],
    }


async def _peers(
    url: str, indices: list[int], total: int, speech: np.ndarray, start_at: float, seconds: float
):
    """Connect the peers numbered `indices` (of `total`), measure them from wall time
    `start_at` for `seconds`. Peer k starts k / total of the way into `speech`, so that
    sessions whose speech has pauses do not all pause at once; peer 0 alone takes the audio
    back (to time it), as decoding it would take the others' share of the two cores here."""
    length = int((start_at - time.time() + seconds + 30) * 16000)
    repeated = np.tile(speech, length // len(speech) + 2)
    audios = [repeated[k * len(speech) // total :][:length] for k in indices]
    peers = [LipSyncPeer(url, audio, receive_audio=k == 0) for k, audio in zip(indices, audios)]
    arrivals: list[dict[int, float]] = []
    async with aiohttp.ClientSession() as http:
        for peer in peers:
            await peer.connect(http)
            arrivals.append(time_audio_packets(peer) if peer.receive_audio else {})
        late = time.time() > start_at
        await asyncio.sleep(max(0.0, start_at - time.time()))
        marks = [(len(p.received.video), len(p.received.events)) for p in peers]
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu_percent = (time.process_time() - cpu) / (time.monotonic() - wall) * 100
        window = (wall, time.monotonic())
        results = [
            _summary(p, video, event, speech_to_return(p, audio, heard, window))
            for p, audio, (video, event), heard in zip(peers, audios, marks, arrivals, strict=True)
        ]
        for peer in peers:
            await peer.close(http)
    return {"connected_late": late, "cpu_percent": cpu_percent, "per_session": results}


class _UndecodedVideo:
    """A peer's video decoder that does not decode: one 2x2 frame for each picture received,
    with its timestamp. Peers that run on the server's machine then count frames without
    taking the cores that decoding them would, as if their decoding ran elsewhere."""

    def decode(self, encoded_frame: JitterFrame) -> list[av.VideoFrame]:
        frame = av.VideoFrame(2, 2, "yuv420p")
        frame.pts = encoded_frame.timestamp
        frame.time_base = VIDEO_TIME_BASE
        return [frame]


def _peer_group(
    url: str,
    indices: list[int],
    total: int,
    speech: np.ndarray,
    start_at: float,
    seconds: float,
    decode_video: bool,
):
    if not decode_video:
        import aiortc.rtcrtpreceiver as receiver

        real = receiver.get_decoder
        receiver.get_decoder = lambda codec: (
            _UndecodedVideo() if codec.mimeType.startswith("video/") else real(codec)
        )
    return asyncio.run(_peers(url, indices, total, speech, start_at, seconds))


def _measure(
    url: str,
    pids: dict[str, int],
    count: int,
    seconds: float,
    speech: np.ndarray,
    processes: int,
    decode_video: bool = True,
) -> dict[str, object]:
    """N sessions, their peers spread over processes, all measured over the same window; the
    server's CPU by thread and by process (the front door and each worker)."""
    processes = min(count, processes)
    groups = [list(range(count))[i::processes] for i in range(processes)]
    start_at = time.time() + 15 + 0.5 * max(map(len, groups))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
        futures = [
            pool.submit(_peer_group, url, group, count, speech, start_at, seconds, decode_video)
            for group in groups
        ]
        time.sleep(max(0.0, start_at - time.time()))
        before, wall = _servers_cpu(pids.values()), time.monotonic()
        processes_before = {name: sum(_thread_cpu(pid).values()) for name, pid in pids.items()}
        gpu = []
        while time.monotonic() - wall < seconds:
            if (sample := _gpu_utilisation()) is not None:
                gpu.append(sample)
            time.sleep(0.5)
        after = _servers_cpu(pids.values())
        elapsed = time.monotonic() - wall
        by_process = {
            name: round((sum(_thread_cpu(pid).values()) - processes_before[name]) / elapsed * 100)
            for name, pid in pids.items()
        }
        outcomes = [future.result() for future in futures]
    threads = {
        name: round((after[name] - before.get(name, 0.0)) / elapsed * 100)
        for name in sorted(after, key=lambda n: before.get(n, 0.0) - after[n])
    }
    return {
        "sessions": count,
        "workers": len(pids) - 1 if len(pids) > 1 else 0,
        "server_cpu_percent": sum(threads.values()),
        "server_cpu_by_process_percent": by_process,
        "server_cpu_by_thread_percent": {k: v for k, v in threads.items() if v >= 1},
        "gpu_utilisation_percent": round(float(np.mean(gpu))) if gpu else None,
        # The peers share the machine: what they take, the server cannot have.
        "peers_cpu_percent": round(sum(outcome["cpu_percent"] for outcome in outcomes)),
        "peers_connected_late": any(outcome["connected_late"] for outcome in outcomes),
        "peers_decode_video": decode_video,
        "per_session": [s for outcome in outcomes for s in outcome["per_session"]],
    }


def _servers_cpu(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds by thread name, summed over the server processes."""
    totals: dict[str, float] = {}
    for pid in pids:
        for name, seconds in _thread_cpu(pid).items():
            totals[name] = totals.get(name, 0.0) + seconds
    return totals


def bench_sessions(
    checkpoint: Path,
    speech_wav: Path,
    device: str,
    counts: list[int],
    seconds: float,
    processes: int,
    delay: float | None,
    workers: int | None,
    log: Path,
    silence_share: float = 0.0,
    server_flags: Sequence[str] = (),
    decode_video: bool = True,
) -> Iterator[dict]:
    """One `lipsync serve`, with `--workers N` when given (the front door and N worker
    processes sharing the device), measured with each count of sessions in turn (yielded as
    each is done); its output goes to `log`. `--min-fps 0`: sessions beyond the device's
    capacity are admitted, to measure how it degrades. `server_flags` go to the server as they
    are (`--backend`, `--max-batch`)."""
    speech = load_audio(speech_wav)
    # Speech, then as much silence as makes `silence_share` of the whole.
    pause = int(len(speech) * silence_share / (1 - silence_share))
    speech = np.concatenate([speech, np.zeros(pause, np.float32)])
    port = free_port()
    command = [
        sys.executable, "-m", "signaling.cli", "serve", "--offline", "--port", str(port),
        "--checkpoint", str(checkpoint), "--device", device,
        "--max-sessions", str(max(counts)), "--min-fps", "0",
    ]  # fmt: skip
    if delay is not None:
        command += ["--delay", str(delay)]
    if workers is not None:
        command += ["--workers", str(workers)]
    command += server_flags
    with tempfile.TemporaryDirectory() as folder, log.open("w") as log_file:
        server = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(os.environ, LIPSYNC_CACHE=folder),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for(url, workers or 1)
            pids = {"front door" if workers else "server": server.pid}
            for i, child in enumerate(_children(server.pid)):
                pids[f"worker {i}"] = child
            for count in counts:
                yield _measure(url, pids, count, seconds, speech, processes, decode_video)
        finally:
            server.terminate()
            server.wait(timeout=30)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def _wait_for(url: str, workers: int) -> None:
    import urllib.request

    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2) as response:
                if len(json.load(response)["workers"]) == workers:
                    return
            time.sleep(0.5)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.5)


def _random_checkpoint(folder: Path) -> Path:
    path = folder / "random_wav2lip.pth"
    torch.save({"state_dict": random_wav2lip().state_dict()}, path)
    return path


def _espeak(folder: Path) -> Path:
    path = folder / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog."
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path


def markdown(report: dict) -> str:
    m, e = report["machine"], report["engine"]
    where = f"{m['cpu']} ({m['cores']} cores)"
    if "gpu" in m:
        where = f"{m['gpu']} (CUDA {m['cuda']}) with {where}"
    lines = [
        f"Measured {m['date']} on {where}, PyTorch {m['torch']}, {report['weights']}. "
        f"Reproduce: `{report['command']}`.",
        "",
        "| engine measure | value |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in e.items()],
    ]
    if not report["sessions"]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| sessions | workers | server CPU | by process | by thread | peers' CPU | GPU busy "
        "| delivered fps (min) "
        "| inferred fps (min-max) | fresh fps (min-max) | mouth age p50 ms (median) "
        "| mouth age p95 ms (max) | speech to returned audio p50 / p95 ms | dropped (max) "
        "| longest repeat run (max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |",
    ]
    for run in report["sessions"]:
        per = run["per_session"]
        threads = ", ".join(f"{k} {v}%" for k, v in run["server_cpu_by_thread_percent"].items())
        by_process = ", ".join(
            f"{k} {v}%" for k, v in run.get("server_cpu_by_process_percent", {}).items()
        )
        gpu = run["gpu_utilisation_percent"]
        generated = [s["generated_fps"] for s in per]
        fresh = [s.get("fresh_fps", s["generated_fps"]) for s in per]
        returned = [d for s in per for d in s.get("speech_to_return_ms", [])]
        back = (
            f"{round(float(np.median(returned)))} / {round(float(np.percentile(returned, 95)))}"
            if returned
            else "-"
        )
        ages = [s for s in per if s["lag_p50_ms"] is not None]  # sessions that showed a mouth
        age_p50 = round(float(np.median([s["lag_p50_ms"] for s in ages]))) if ages else "-"
        age_p95 = max(s["lag_p95_ms"] for s in ages) if ages else "-"
        late = " (peers connected late)" if run["peers_connected_late"] else ""
        lines.append(
            f"| {run['sessions']}{late} | {run.get('workers', 0) or '-'} "
            f"| {run['server_cpu_percent']}% | {by_process or '-'} "
            f"| {threads} | {run.get('peers_cpu_percent', '-')}% "
            f"| {'-' if gpu is None else f'{gpu}%'} "
            f"| {min(s['delivered_fps'] for s in per)} | {min(generated)}-{max(generated)} "
            f"| {min(fresh)}-{max(fresh)} "
            f"| {age_p50} | {age_p95} | {back} "
            f"| {max(s['dropped_total'] for s in per)} "
            f"| {max(s['longest_repeat_run'] for s in per)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: random)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4, help="the engine's batch size")
    parser.add_argument("--photo", type=Path, default=PHOTO, help="the face for the engine")
    parser.add_argument("--speech", type=Path, help="a speech recording (default: espeak-ng)")
    parser.add_argument(
        "--sessions", type=int, nargs="*", default=[1, 2], help="session counts (none: engine only)"
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--peer-processes", type=int, default=1)
    parser.add_argument("--delay", type=float, help="the server's delay (default: its own)")
    parser.add_argument(
        "--workers",
        type=int,
        help="serve with a front door and this many worker processes (default: one process)",
    )
    parser.add_argument(
        "--silence-share",
        type=float,
        default=0.0,
        help="the share of silence in what the peers send, after each sentence (0 to 0.9)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="how the server runs Wav2Lip (its --backend)",
    )
    parser.add_argument("--max-batch", type=int, help="the server's --max-batch")
    parser.add_argument(
        "--peers-skip-video-decoding",
        action="store_true",
        help="peers count video frames without decoding them, as if decoding ran elsewhere",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    server_flags = ["--backend", args.backend]
    if args.max_batch is not None:
        server_flags += ["--max-batch", str(args.max_batch)]
    batches = GPU_BATCHES if args.device == "cuda" else []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or _random_checkpoint(Path(folder))
        speech = args.speech or _espeak(Path(folder))
        report = {
            "machine": machine(args.device),
            "command": "python -m bench.run " + " ".join(sys.argv[1:]),
            "weights": str(args.checkpoint) if args.checkpoint else "random weights",
            "engine": bench_engine(checkpoint, args.photo, args.device, args.batch, batches),
        }
        report["sessions"] = []
        _write(args.out, report)  # the engine's figures, should a session count not finish
        runs = bench_sessions(
            checkpoint, speech, args.device, args.sessions, args.seconds,
            args.peer_processes, args.delay, args.workers, args.out / "server.log",
            args.silence_share, server_flags, not args.peers_skip_video_decoding,
        ) if args.sessions else []  # fmt: skip
        for run in runs:
            report["sessions"].append(run)
            _write(args.out, report)
    print(markdown(report))


def _write(folder: Path, report: dict) -> None:
    (folder / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "latest.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
