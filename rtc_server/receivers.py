"""The microphone's packets, handed to the decoder as they come.

aiortc's audio receiver keeps its packets in a jitter buffer made for a player that must never
run dry: it holds four (80 ms) before the first is decoded, releases one packet for each that
arrives, and at a lost packet waits until sixteen have piled up behind the gap; then it goes on
releasing one per arrival, so some fourteen (280 ms) stay behind for the rest of the call.
The server is no such player: the microphone places each frame on the session's timeline by
its RTP timestamp, whenever it comes, and the session waits for late audio as long as that
session's measured jitter says (`rtc_server.jitter`). An Opus packet is a whole frame, so each
is handed on as it comes; one that comes after a later one (reordered, or repeated) is dropped,
and its 20 ms stays silence, as a lost packet's does.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

# How far back a sequence number may go and still be a late packet of this stream, not a
# stream that started again (aiortc's own limit for misordered packets).
MAX_MISORDER = 100
_SEQUENCE = 1 << 16
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


class PromptAudioBuffer(JitterBuffer):
    """A jitter buffer in name only: every audio packet newer than the last one handed on
    is handed on at once."""

    def __init__(self) -> None:
        super().__init__(capacity=2)  # its storage is unused
        self._last: int | None = None

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._last is not None:
            back = (self._last - packet.sequence_number) % _SEQUENCE
            if back < MAX_MISORDER:  # a repeat (0), or older than one handed on already
                return False, None
        self._last = packet.sequence_number
        # The receiver sets `_data` (the depacketized payload) before it adds the packet.
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)  # type: ignore[attr-defined]


def decode_audio_promptly(pc: RTCPeerConnection) -> None:
    """Give the connection's audio receivers a buffer that holds no packet back (call it once
    the remote description has made them)."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or not hasattr(receiver, _ATTRIBUTE):
            continue  # an aiortc that has changed: it keeps its own
        setattr(receiver, _ATTRIBUTE, PromptAudioBuffer())
