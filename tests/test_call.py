"""`lipsync call`, run as a user runs it, against a real server: the MP4 it writes has the
video and the audio in sync, and a server it cannot reach or that refuses it is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from signaling.config import ServerConfig
from tests.servers import serve_in_thread

pytestmark = pytest.mark.slow

SILENCE = 1.0  # seconds before the speech: the resting face, for reference


def _lipsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signaling.cli", "call", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def speech_file(speech_16k: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("call") / "speech.wav"
    soundfile.write(path, np.concatenate([np.zeros(int(SILENCE * 16_000)), speech_16k]), 16_000)
    return path


def _video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's time in the file, and how far its mouth is from the resting one: the
    mouth being the 8x8-pixel blocks that change most over the call."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(float(f.time), f.to_ndarray(format="gray")) for f in container.decode(stream)]
    times = np.array([t for t, _ in frames])
    rows, cols = (size // 8 * 8 for size in frames[0][1].shape)
    blocks = np.stack(
        [g[:rows, :cols].astype(np.float32).reshape(rows // 8, 8, cols // 8, 8).mean(axis=(1, 3))
         for _, g in frames]
    )  # fmt: skip
    spread = blocks.std(axis=0)
    mouth = blocks[:, spread > spread.max() / 2]
    rest = np.median(mouth[(times > 0.3) & (times < SILENCE - 0.2)], axis=0)
    return times, np.abs(mouth - rest).mean(axis=1)


def _audio(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        first = None
        chunks = []
        for frame in container.decode(stream):
            first = float(frame.time) if first is None else first
            chunks.append(frame.to_ndarray()[0])
        return np.concatenate(chunks), stream.rate, first or 0.0  # type: ignore[return-value]


@pytest.mark.parametrize("push", [False, True], ids=["microphone", "pushed"])
def test_call_records_an_mp4_in_sync(
    push: bool, speech_file: Path, faces_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "call.mp4"
    with serve_in_thread(ServerConfig(offline=True)) as served:
        args = ["--server", served.url, "--audio", str(speech_file), "-o", str(output), "-q"]
        run = _lipsync(*args, "--face", str(faces_dir / "obama.jpg"), *(["--push"] if push else []))
    assert run.returncode == 0, run.stderr
    assert "frames in" in run.stdout and "delivered" in run.stdout and str(output) in run.stdout

    times, moved = _video(output)
    samples, rate, audio_start = _audio(output)
    speech_seconds = soundfile.info(speech_file).duration
    assert times[-1] > speech_seconds  # the whole speech, and the tail
    assert (len(times) - 1) / (times[-1] - times[0]) > 23  # 25 fps

    # Sound and mouth start together: the mouth may lead by up to 0.1 s, as it shows the mel
    # window of the 0.2 s from its frame on (see test_sessions_e2e).
    step = rate // 50
    loud = np.abs(samples[: len(samples) // step * step].reshape(-1, step)).max(axis=1) > 0.05
    sound_onset = audio_start + np.argmax(loud) / 50
    mouth_onset = times[np.argmax((times > 0.5) & (moved > 3.0))]
    print(f"sound onset - mouth onset: {1000 * (sound_onset - mouth_onset):.0f} ms")
    assert -0.05 < sound_onset - mouth_onset < 0.16, (sound_onset, mouth_onset)
    # And end together.
    last_sound = audio_start + (len(loud) - 1 - np.argmax(loud[::-1])) / 50
    last_move = times[len(moved) - 1 - np.argmax(moved[::-1] > 3.0)]
    assert abs(last_sound - last_move) < 0.2, (last_sound, last_move)


def test_call_says_clearly_when_the_server_cannot_be_reached(speech_file: Path) -> None:
    run = _lipsync("--server", "http://127.0.0.1:9", "--audio", str(speech_file), "-q")
    assert run.returncode == 2
    assert "cannot reach the server at http://127.0.0.1:9" in run.stderr
    assert "Traceback" not in run.stderr


def test_call_says_clearly_when_the_server_refuses(speech_file: Path, tmp_path: Path) -> None:
    with serve_in_thread(ServerConfig(offline=True, api_key="k" * 32)) as served:
        refused = _lipsync("--server", served.url, "--audio", str(speech_file), "-q")
        not_audio = _lipsync("--server", served.url, "--audio", __file__, "-q")
    assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr
    assert not_audio.returncode == 2 and "cannot read" in not_audio.stderr, not_audio.stderr
    assert "Traceback" not in refused.stderr + not_audio.stderr
