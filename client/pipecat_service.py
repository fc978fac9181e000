"""A face for a Pipecat voice agent: TTS audio in, the lip-synced video and its audio out.

`LipSyncVideoService` sits where Pipecat's own avatar services (Simli, Tavus) sit, after the
TTS: it pushes each `TTSAudioRawFrame` to a lipsync server's push session as fast as it comes,
and sends on downstream what the server plays back at real time: `OutputImageRawFrame`s at
25 fps and the speech again as `TTSAudioRawFrame`s, in sync with the face. An
`InterruptionFrame` (the user barged in) becomes `clear_buffer`, and `TTSStoppedFrame` ends
the utterance.

Install with `pip install lipsync[pipecat]`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import av
import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import (
    FrameDirection,
    FrameProcessor,
    FrameProcessorSetup,
)

from client.peer import LipSyncPusher

PUSH_RATES = (16_000, 24_000, 48_000)  # what a push session takes
# Returned media waiting to go downstream; beyond this the pipeline is stalled, and the oldest
# is let go, as a late frame is worth nothing to a live face.
MAX_WAITING = 50


class _Media:
    """Takes what the session sends back (the `Recorder` of client.peer) for the service to
    send downstream: video frames, and the audio while an utterance plays."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[av.VideoFrame | av.AudioFrame] = asyncio.Queue()
        self.playing = False  # between playback_started and playback_finished

    def _put(self, frame: av.VideoFrame | av.AudioFrame) -> None:
        if self.queue.qsize() >= MAX_WAITING:
            self.queue.get_nowait()
        self.queue.put_nowait(frame)

    def video(self, frame: av.VideoFrame, arrived: float) -> None:
        self._put(frame)

    def audio(self, received: av.AudioFrame, arrived: float) -> None:
        # Outside an utterance the server sends silence, which Pipecat would take for the bot
        # speaking.
        if self.playing:
            self._put(received)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "playback_started":
            self.playing = True
        elif event.get("type") == "playback_finished":
            self.playing = False


class LipSyncVideoService(FrameProcessor):
    """TTS audio frames in; the face's video frames and its audio out.

    `server` is the lipsync server's URL; `avatar` an avatar id there (the server's default
    when None); `token` its API key or a token minted with it, when it requires one.
    """

    def __init__(
        self,
        server: str,
        *,
        avatar: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._server = server
        self._avatar = avatar
        self._token = token
        self._media = _Media()
        self._http: aiohttp.ClientSession | None = None
        self._pusher: LipSyncPusher | None = None
        self._forwarding: asyncio.Task[None] | None = None
        self._rate = 24_000  # the pipeline's output audio rate
        self._to_push: tuple[tuple[int, int], av.AudioResampler] | None = None
        self._to_pipeline = av.AudioResampler(format="s16", layout="mono", rate=self._rate)

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]
        """Open the push session; Pipecat sets processors up before the StartFrame."""
        await super().setup(setup)
        self._rate = setup.audio_out_sample_rate
        self._to_pipeline = av.AudioResampler(format="s16", layout="mono", rate=self._rate)
        self._http = aiohttp.ClientSession()
        self._pusher = LipSyncPusher(
            self._server,
            sample_rate=self._rate if self._rate in PUSH_RATES else 24_000,
            avatar=self._avatar,
            token=self._token,
            recorder=self._media,
            history=False,
            on_event=self._media.event,
        )
        try:
            await self._pusher.connect(self._http)
            await self._pusher.wait_open()
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
            await self.push_error(f"the lipsync server refused the session: {exc}", exc, True)
            return
        self._forwarding = self.create_task(self._forward())

    async def cleanup(self) -> None:
        await self._close()
        await super().cleanup()

    async def _close(self) -> None:
        """End the session and the connection; safe to call more than once."""
        if self._forwarding is not None:
            await self.cancel_task(self._forwarding)
            self._forwarding = None
        pusher, self._pusher = self._pusher, None
        if pusher is not None and self._http is not None:
            with contextlib.suppress(aiohttp.ClientError):
                await pusher.close(self._http)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._push(frame)  # comes back as the face's audio: not sent on
            return
        if isinstance(frame, InterruptionFrame) and self._pusher is not None:
            self._pusher.clear_buffer()
            self._media.playing = False
            while not self._media.queue.empty():  # made from what was just cleared
                self._media.queue.get_nowait()
        elif isinstance(frame, TTSStoppedFrame) and self._pusher is not None:
            self._pusher.end_of_segment()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
        await self.push_frame(frame, direction)

    def _push(self, frame: TTSAudioRawFrame) -> None:
        """Send TTS audio to the session, resampled to its rate when it differs."""
        if self._pusher is None:
            return
        pcm = np.frombuffer(frame.audio, np.int16)
        rate = self._pusher.sample_rate
        if (frame.sample_rate, frame.num_channels) != (rate, 1):
            source = (frame.sample_rate, frame.num_channels)
            if self._to_push is None or self._to_push[0] != source:
                self._to_push = source, av.AudioResampler(format="s16", layout="mono", rate=rate)
            layout = "mono" if frame.num_channels == 1 else "stereo"
            audio = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout=layout)
            audio.sample_rate = frame.sample_rate
            pcm = np.concatenate(
                [out.to_ndarray()[0] for out in self._to_push[1].resample(audio)] or [pcm[:0]]
            )
        self._pusher.send_pcm(pcm.astype("<i2").tobytes())

    async def _forward(self) -> None:
        """Send what the session plays back downstream, as it arrives."""
        while True:
            frame = await self._media.queue.get()
            if isinstance(frame, av.VideoFrame):
                # The colour conversion off the event loop: it takes a millisecond or more.
                rgb = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                image = OutputImageRawFrame(
                    image=rgb.tobytes(), size=(frame.width, frame.height), format="RGB"
                )
                await self.push_frame(image)
            else:
                frame.pts = None  # the resampler times its output by what it was given
                for out in self._to_pipeline.resample(frame):
                    pcm = out.to_ndarray()[0].astype("<i2").tobytes()
                    await self.push_frame(
                        TTSAudioRawFrame(audio=pcm, sample_rate=self._rate, num_channels=1)
                    )
