"""The benchmark: the engine against the plain PyTorch forward, and live sessions end to end.

    python -m bench.run [--checkpoint PATH] [--sessions 1 2] [--seconds 20]

Everything is measured in one run on one machine, and written with the machine and the date to
bench/results/latest.json and bench/results/latest.md (the docs quote the latter). Without a
checkpoint, random weights in the official layout are used: speed does not depend on the values.

1. Engine: frames per second of the plain forward (the official model as loaded, batch 1 and
   the engine's batch) and of the engine (BatchNorm folded, face features cached, only the rows
   the feathered blend shows), and the largest difference between the two in the picture.
   The engine runs with each backend: PyTorch, ONNX Runtime (fp32, the CPU default) and ONNX
   Runtime int8 (an option: faster, not exact).
2. Sessions: a `lipsync serve` process and N real aiortc peers on loopback streaming espeak-ng
   speech in real time; per session the delivered fps (at the peer), the generated fps (frames
   really inferred, from the server's stats), lag p50 and p95, the longest run of repeated
   frames, and the server's CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch

from rtc_server.peer import LipSyncPeer
from tests.conftest import free_port, random_wav2lip
from wav2lip.audio import load_audio
from wav2lip.blend import Blender, first_face_row
from wav2lip.checkpoint import load_checkpoint
from wav2lip.engine import Engine
from wav2lip.faces import find_face, model_input, read_image

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT.parent / "shared" / "testdata" / "faces" / "obama.jpg"
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, object]:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _per_frame(run, frames: int, repeats: int = 5) -> float:
    """Seconds per frame of `run`, best of `repeats` after a warm-up."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / frames


@torch.inference_mode()
def bench_engine(checkpoint: Path, batch: int) -> dict[str, object]:
    model = load_checkpoint(checkpoint)
    image = read_image(PHOTO)
    box = find_face(image)
    face = model_input(image, box)
    rng = np.random.default_rng(0)
    mels = rng.uniform(-4, 4, (batch, 80, 16)).astype(np.float32)
    mel_t = torch.from_numpy(mels[:, None])
    faces_t = torch.from_numpy(face[None]).expand(batch, -1, -1, -1).contiguous()
    plain_1 = _per_frame(lambda: model(mel_t[:1], faces_t[:1]), 1)
    plain_out = (model(mel_t, faces_t).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    blender = Blender(box, image.shape)
    shown_plain = [blender.paste(image, mouth).astype(int) for mouth in plain_out]
    report: dict[str, object] = {
        "batch": batch,
        "plain_ms_per_frame_batch1": round(plain_1 * 1000, 1),
    }
    if batch > 1:
        plain_b = _per_frame(lambda: model(mel_t, faces_t), batch)
        report[f"plain_ms_per_frame_batch{batch}"] = round(plain_b * 1000, 1)
    # The engine with each backend; the difference is in what is shown: both pasted into the
    # photo with the feathered blend.
    for backend in ("torch", "onnxruntime", "onnxruntime-int8"):
        engine = Engine(model, device="cpu", first_row=first_face_row("feather"), backend=backend)
        run = functools.partial(engine.infer, engine.prepare(face), mels)
        seconds = _per_frame(run, batch)
        shown = [blender.paste(image, mouth) for mouth in run()]
        diff = [np.abs(a - b) for a, b in zip(shown_plain, shown)]
        report[f"engine_{backend}_ms_per_frame"] = round(seconds * 1000, 1)
        report[f"engine_{backend}_speedup_vs_plain_batch1"] = round(plain_1 / seconds, 2)
        report[f"engine_{backend}_max_difference_shown"] = int(max(d.max() for d in diff))
    return report


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _sessions(url: str, count: int, seconds: float, speech: np.ndarray, pid: int) -> dict:
    audio = np.concatenate([np.zeros(8000, np.float32), *[speech] * 20])[: int(seconds * 16000)]
    peers = [LipSyncPeer(url, audio, receive_audio=False) for _ in range(count)]
    async with aiohttp.ClientSession() as http:
        for peer in peers:
            await peer.connect(http)
        cpu_start, wall_start = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(seconds)
        cpu = (_cpu_seconds(pid) - cpu_start) / (time.monotonic() - wall_start)
        for peer in peers:
            await peer.close(http)
    results = []
    for peer in peers:
        times = np.array([t for t, _, _ in peer.received.video])
        steady = times[times > times[0] + 2.0]
        stats = [e for e in peer.received.events if e["type"] == "stats"][2:]
        lag50 = [s["lag_ms"] for s in stats if s["lag_ms"] is not None]
        lag95 = [s["lag_p95_ms"] for s in stats if s["lag_p95_ms"] is not None]
        results.append(
            {
                "delivered_fps": round((len(steady) - 1) / (steady[-1] - steady[0]), 1),
                "generated_fps": round(float(np.mean([s["generated_fps"] for s in stats])), 1),
                "lag_p50_ms": round(float(np.median(lag50))),
                "lag_p95_ms": round(float(np.percentile(lag95, 95))),
                "dropped_total": stats[-1]["dropped"],
                "longest_repeat_run": stats[-1]["longest_repeat_run"],
            }
        )
    return {"sessions": count, "server_cpu_percent": round(cpu * 100), "per_session": results}


def bench_sessions(checkpoint: Path, counts: list[int], seconds: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        speech_wav = Path(folder) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-w", str(speech_wav), "The quick brown fox jumps over the lazy dog."],
            check=True,
        )
        speech = load_audio(speech_wav)
        port = free_port()
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "lipsync"), "serve", "--offline",
                "--port", str(port), "--checkpoint", str(checkpoint), "--device", "cpu",
                "--max-sessions", str(max(counts)),
            ],
            env=dict(os.environ, LIPSYNC_CACHE=folder),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_for(url)
            return [
                asyncio.run(_sessions(url, count, seconds, speech, server.pid)) for count in counts
            ]
        finally:
            server.terminate()
            server.wait(timeout=10)


def _wait_for(url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/health", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.5)


def _random_checkpoint(folder: Path) -> Path:
    path = folder / "random_wav2lip.pth"
    torch.save({"state_dict": random_wav2lip().state_dict()}, path)
    return path


def markdown(report: dict) -> str:
    m, e = report["machine"], report["engine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), PyTorch {m['torch']}, "
        f"{report['weights']}. Reproduce: `python -m bench.run`.",
        "",
        "| engine measure | value |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in e.items()],
        "",
        "| sessions | server CPU | session | delivered fps | generated fps | lag p50 ms "
        "| lag p95 ms | dropped | longest repeat run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["sessions"]:
        for i, s in enumerate(run["per_session"]):
            lines.append(
                f"| {run['sessions']} | {run['server_cpu_percent']}% | {i + 1} "
                f"| {s['delivered_fps']} | {s['generated_fps']} | {s['lag_p50_ms']} "
                f"| {s['lag_p95_ms']} | {s['dropped_total']} | {s['longest_repeat_run']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="Wav2Lip weights (default: random)")
    parser.add_argument("--batch", type=int, default=4, help="the engine's batch size")
    parser.add_argument("--sessions", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = args.checkpoint or _random_checkpoint(Path(folder))
        report = {
            "machine": machine(),
            "weights": str(args.checkpoint) if args.checkpoint else "random weights",
            "engine": bench_engine(checkpoint, args.batch),
            "sessions": bench_sessions(checkpoint, args.sessions, args.seconds),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
