"""How fast clear_buffer shows at the peer: the mouth at rest, the audio silent, and
playback_finished, over many interruptions at different points of an utterance.

    python -m bench.interrupt [--trials 20]

A `lipsync serve --offline` process (the animator, whose mouth plainly follows speech), and
here one push session per trial: espeak speech pushed 8 times faster than real time, then
clear_buffer mid-word, from 0.5 to 5 s into its playback. Measured as tests/test_push.py measures it
(tests/measure.py): video where frames are complete at the peer, audio where its packets
arrive. Results go to bench/results/interrupt.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.run import machine
from tests.conftest import free_port
from tests.measure import LOUD, Interruption, at_rate, interrupt, open_pushing
from wav2lip.audio import load_audio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RATE = 24_000
TEXT = "Hello there. The quick brown fox jumps over the lazy dog."


def _speech() -> np.ndarray:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        sys.exit("espeak-ng is needed: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run([espeak, "-w", str(wav), TEXT], check=True)
        speech = load_audio(wav)
    return at_rate(np.concatenate([speech, speech]), RATE)


async def _trials(url: str, count: int) -> list[tuple[float, Interruption]]:
    speech = _speech()
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 120
        while True:  # the server loads and warms up
            try:
                async with http.get(f"{url}/api/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not start")
            await asyncio.sleep(0.5)
        results = []
        for after in _mid_word(speech, count):
            pushing = await open_pushing(http, url, RATE)
            cut = await interrupt(pushing, speech, float(after))
            await pushing.pusher.close(http)
            results.append((float(after), cut))
            print(f"after {after:.2f} s: {cut}", flush=True)
        return results


def _mid_word(speech: np.ndarray, count: int) -> list[float]:
    """`count` moments, 0.5 to 5 s into the speech, each inside a word: loud from 60 ms before to
    120 ms after. (In a pause the sound stops before the cut, and what the peer heard
    could not be told from the audio.)"""
    step = RATE // 50
    loud = np.abs(speech[: len(speech) // step * step].reshape(-1, step)).max(axis=1) > LOUD
    inside = [chunk / 50 for chunk in range(25, 250) if loud[chunk - 3 : chunk + 6].all()]
    return [inside[i] for i in np.linspace(0, len(inside) - 1, count).round().astype(int)]


def _ms(values: list[float]) -> dict[str, float]:
    array = 1000 * np.array(values)
    return {
        "p50": round(float(np.percentile(array, 50)), 1),
        "p95": round(float(np.percentile(array, 95)), 1),
        "max": round(float(array.max()), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "signaling.cli", "serve", "--offline", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        trials = asyncio.run(_trials(f"http://127.0.0.1:{port}", args.trials))
    finally:
        server.terminate()
        server.wait()
    cuts = [cut for _, cut in trials]
    figures = {
        "mouth at rest": _ms([c.rest for c in cuts]),
        "audio silent": _ms([c.silent for c in cuts]),
        "playback_finished received": _ms([c.finished for c in cuts]),
        "playback_position, off what was heard by": _ms([abs(c.position - c.heard) for c in cuts]),
    }
    m = machine("cpu")
    lines = [
        f"clear_buffer at the peer, {len(cuts)} interruptions mid-word, 0.5 to 5 s into an "
        f"utterance (the animator, loopback): {m['cpu']} ({m['cores']} cores), {m['date']}. "
        "Reproduce: `python -m bench.interrupt`.",
        "",
        "| from clear_buffer sent to | p50 | p95 | max |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {f['p50']} ms | {f['p95']} ms | {f['max']} ms |"
            for name, f in figures.items()
        ),
    ]
    rows = [{"after": after, **dataclasses.asdict(cut)} for after, cut in trials]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "interrupt.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "interrupt.json").write_text(
        json.dumps({"machine": m, "figures_ms": figures, "trials": rows}, indent=2, default=float)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
