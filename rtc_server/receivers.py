"""The microphone's packets, decoded as soon as they are complete.

aiortc's audio receiver holds four packets (80 ms) in its jitter buffer before it decodes the
first: a playout buffer, for a player that must never run dry. The server is no such player:
the microphone places each frame on the session's timeline by its RTP timestamp, whenever it
comes, and the session waits for late audio as long as that session's measured jitter says
(`rtc_server.jitter`). Those 80 ms only added to every sound's way to the face. With a prefetch
of one, a packet is decoded once the next one shows it complete, 20 ms later: the least this
jitter buffer allows. Reordered packets still wait for the missing one, as before.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer

# RTCRtpReceiver's own, but for the prefetch.
CAPACITY = 16
PREFETCH = 1
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


def decode_audio_promptly(pc: RTCPeerConnection) -> None:
    """Give the connection's audio receivers a jitter buffer that does not hold packets back
    (call it once the remote description has made them)."""
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind != "audio" or not hasattr(receiver, _ATTRIBUTE):
            continue  # an aiortc that has changed: it keeps its own
        setattr(receiver, _ATTRIBUTE, JitterBuffer(capacity=CAPACITY, prefetch=PREFETCH))
