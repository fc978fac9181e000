"""The offline renderer: a photo and an audio file in, a lip-synced H.264 MP4 out.

It is the official inference for a still photo: one video frame per official mel window at
25 fps, the face found once, and the audio muxed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from wav2lip.audio import FPS, SAMPLE_RATE, Alignment, load_audio, mel_windows, melspectrogram
from wav2lip.blend import Blender
from wav2lip.engine import Engine
from wav2lip.faces import FaceBox, find_face, model_input, read_image


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    box: FaceBox


def even_size(image: np.ndarray) -> np.ndarray:
    """Crop a row or column if needed: H.264 in yuv420p needs even dimensions."""
    height, width = image.shape[:2]
    return image[: height - height % 2, : width - width % 2]


def _batches(windows: list[np.ndarray], size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(windows), size):
        yield np.stack(windows[start : start + size])


def _encode_audio(
    container: av.container.OutputContainer, stream: av.AudioStream, samples: np.ndarray
) -> None:
    size = stream.codec_context.frame_size or 1024
    for start in range(0, len(samples), size):
        frame = av.AudioFrame.from_ndarray(
            samples[None, start : start + size], format="flt", layout="mono"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = start
        frame.time_base = Fraction(1, SAMPLE_RATE)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def render(
    face: str | Path,
    audio: str | Path,
    output: str | Path,
    engine: Engine,
    *,
    box: FaceBox | None = None,
    s3fd_path: Path | None = None,
    blend: str = "feather",
    batch_size: int = 16,
    progress: bool = True,
    alignment: Alignment = "training",
) -> RenderResult:
    """Render `face` speaking `audio` into `output` (an .mp4); `alignment` "official" gives
    each frame the audio window the official inference.py gives it."""
    image = even_size(read_image(face))
    samples = load_audio(audio)
    windows = list(mel_windows(melspectrogram(samples), alignment))
    face_box = find_face(image, box=box, s3fd_path=s3fd_path)
    prepared = engine.prepare(model_input(image, face_box))
    blender = Blender(face_box, image.shape, mode=blend)

    output = Path(output)
    with av.open(str(output), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height = image.shape[1], image.shape[0]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"}
        # Both streams exist before the first packet: the header is written then.
        sound = container.add_stream("aac", rate=SAMPLE_RATE)
        sound.layout = "mono"
        with tqdm(total=len(windows), unit="frame", disable=not progress) as bar:
            for batch in _batches(windows, batch_size):
                for mouth in engine.infer(prepared, batch):
                    picture = blender.paste(image, mouth)
                    frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
                    container.mux(video.encode(frame))
                bar.update(len(batch))
        container.mux(video.encode(None))
        _encode_audio(container, sound, samples)
    return RenderResult(output, len(windows), face_box)
