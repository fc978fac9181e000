"""The offline renderer and the `lipsync` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from signaling.cli import main
from wav2lip.audio import mel_windows, melspectrogram


def _render(face: Path, audio: Path, out: Path, *extra: str) -> int:
    return main(["render", "--face", str(face), "--audio", str(audio), "-o", str(out), *extra])


def _probe(path: Path) -> tuple[list[np.ndarray], float, int]:
    """Decoded video frames, the audio's duration in seconds, and the audio sample rate."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(f.samples for f in container.decode(audio=0))
        rate = stream.rate
    return frames, samples / rate, rate


def test_render_speech_to_mp4(
    tmp_path: Path, faces_dir: Path, speech_wav: Path, speech_16k: np.ndarray, checkpoint_path
) -> None:
    out = tmp_path / "out.mp4"
    photo, flags = faces_dir / "obama.jpg", ("--checkpoint", str(checkpoint_path), "-q")
    code = _render(photo, speech_wav, out, *flags, "--alignment", "official")
    assert code == 0
    frames, audio_seconds, rate = _probe(out)
    expected = len(list(mel_windows(melspectrogram(speech_16k), "official")))
    assert len(frames) == expected  # one frame per official mel window
    assert rate == 16000
    assert abs(audio_seconds - len(speech_16k) / 16000) < 0.1
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264"
        assert video.average_rate == 25
        assert (video.width, video.height) == (910 - 910 % 2, 1137 - 1137 % 2)
    # The mouth region changes from frame to frame; the top of the photo does not.
    stack = np.stack(frames).astype(np.int16)
    assert np.abs(np.diff(stack[:, :200], axis=0)).mean() < 1.0
    face_region = stack[:, 300:460, 330:600]
    assert np.abs(np.diff(face_region, axis=0)).mean() > 1.0


def test_render_errors_are_clear(
    tmp_path: Path, faces_dir: Path, speech_wav: Path, checkpoint_path, capsys
) -> None:
    base = ["render", "-o", str(tmp_path / "o.mp4"), "--checkpoint", str(checkpoint_path), "-q"]
    assert main([*base, "--face", str(tmp_path / "nope.jpg"), "--audio", str(speech_wav)]) == 2
    assert "photo not found" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main([*base, "--face", str(faces_dir / "obama.jpg"), "--audio", str(text)]) == 2
    assert "not a readable audio file" in capsys.readouterr().err
    assert main([*base, "--face", str(text), "--audio", str(speech_wav)]) == 2
    assert "error" in capsys.readouterr().err
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    assert main([*base, "--face", str(blank), "--audio", str(speech_wav)]) == 2
    assert "face" in capsys.readouterr().err.lower()


def test_render_without_checkpoint_says_what_to_do(tmp_path, faces_dir, speech_wav, capsys):
    code = _render(
        faces_dir / "obama.jpg", speech_wav, tmp_path / "o.mp4", "--cache", str(tmp_path / "c")
    )
    assert code == 2
    assert "lipsync weights fetch" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lipsync"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("render", "weights"):
        assert command in result.stdout


@pytest.mark.parametrize("argv", [["weights", "list"]])
def test_weights_list_command(tmp_path, argv, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LIPSYNC_CACHE", str(tmp_path))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out
    assert "wav2lip_gan.pth" in out and "missing" in out


def test_weights_fetch_of_an_unknown_model_names_the_known_ones(tmp_path, capsys) -> None:
    assert main(["weights", "fetch", "nope.pth", "--cache", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "wav2lip_gan.pth" in err
