"""Recording what a session sends back to an MP4: H.264 video, AAC audio, in sync.

The server sends each frame and each 20 ms of audio at the moment it shows, on one clock, so
their arrival times here keep them in sync; both are placed in the file by arrival, from the
first video frame on. Frames are encoded as they come, so a long call holds no frames in memory.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VIDEO_RATE = 25
AUDIO_RATE = 48_000
MILLISECONDS = Fraction(1, 1000)


class Mp4Recorder:
    """Video frames and audio chunks in, with their arrival times (time.monotonic())."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._container = av.open(str(path), "w", format="mp4")
        self._video: av.VideoStream | None = None
        self._audio = self._container.add_stream("aac", rate=AUDIO_RATE)
        self._audio.layout = "mono"
        self._start: float | None = None  # the first video frame's arrival
        self._last_pts = -1
        self._audio_samples: int | None = None  # where the next audio chunk goes, in samples
        self.frames = 0

    def video(self, frame: av.VideoFrame, arrived: float) -> None:
        if self._video is None:
            self._start = arrived
            self._video = self._container.add_stream("libx264", rate=VIDEO_RATE)
            self._video.width, self._video.height = frame.width, frame.height
            self._video.pix_fmt = "yuv420p"
            self._video.time_base = MILLISECONDS
            self._video.codec_context.time_base = MILLISECONDS
            self._video.options = {"preset": "veryfast", "crf": "23"}
        assert self._start is not None
        pts = max(self._last_pts + 1, round((arrived - self._start) * 1000))
        self._last_pts = pts
        image = frame.reformat(format="yuv420p")
        image.pts, image.time_base = pts, MILLISECONDS
        for packet in self._video.encode(image):
            self._container.mux(packet)
        self.frames += 1

    def audio(self, received: av.AudioFrame, arrived: float) -> None:
        """A decoded audio frame (aiortc's: 48 kHz, s16, usually stereo); its first channel."""
        if self._start is None:
            return  # before the first frame: the file starts with the video
        channels = len(received.layout.channels)
        samples = received.to_ndarray().reshape(-1, channels)[:, 0].astype(np.float32)
        if received.format.name.startswith("s16"):
            samples /= 32768
        if self._audio_samples is None:
            self._audio_samples = max(0, round((arrived - self._start) * AUDIO_RATE) - len(samples))
        pcm = np.clip(samples, -1, 1).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="flt", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts, frame.time_base = self._audio_samples, Fraction(1, AUDIO_RATE)
        self._audio_samples += len(samples)
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoders and finish the file."""
        for stream in (self._video, self._audio):
            if stream is not None:
                for packet in stream.encode(None):
                    self._container.mux(packet)
        self._container.close()
