"""What an offer asks of a session, checked before anything is set up for it.

Four kinds of peer make offers:

- a caller (the page, the Python client) sends the microphone and receives the video, and
  the returned audio if it wants it;
- a pusher (a voice agent) pushes its audio on a data channel instead: its offer receives
  the video (and the audio, if it wants it) and has a data channel; it need not send audio;
- an ingest (a WHIP encoder) only sends audio: its video is for viewers;
- a viewer (WHEP) only receives the video, and the audio if it wants it.

An offer that asks for more than its kind uses (a second audio track, say) is refused.

Browsers that hide their addresses behind mDNS names (`<uuid>.local`: Firefox, Safari) offer
only such candidates, which a server cannot resolve; aioice would then run out of candidates
and fail at once. `for_ice` drops the offer's end-of-candidates in that case, so aioice waits
for the browser's own connectivity checks, which reveal its address (a peer-reflexive
candidate), as RFC 8445 and the mDNS draft intend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiortc.sdp import SessionDescription

CALLER, PUSHER, INGEST, VIEWER = "caller", "pusher", "ingest", "viewer"
SENDS = ("sendrecv", "sendonly")
RECEIVES = ("sendrecv", "recvonly")
# The m-lines each kind may have.
USABLE = {
    CALLER: {"audio": 1, "video": 1, "application": 1},
    PUSHER: {"audio": 1, "video": 1, "application": 1},
    INGEST: {"audio": 1, "video": 0, "application": 1},
    VIEWER: {"audio": 1, "video": 1, "application": 0},
}
MDNS_CANDIDATE = re.compile(r"^a=candidate:.* [0-9a-f-]+\.local ", re.MULTILINE | re.IGNORECASE)


class BadOffer(ValueError):
    """The offer cannot start a session; the message says why."""


@dataclass(frozen=True)
class Offer:
    sends_audio: bool
    receives_audio: bool
    receives_video: bool


def read_offer(sdp: str, kind: str) -> Offer:
    """What the offer asks for; BadOffer if that is not what a peer of this kind uses."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser fails with many types, asserts among them
        raise BadOffer(f"malformed SDP: {exc or type(exc).__name__}") from exc
    usable = USABLE[kind]
    for media in {m.kind for m in description.media}:
        count = sum(m.kind == media for m in description.media)
        if count > usable.get(media, 0):
            allowed = ", ".join(f"{n} {k}" for k, n in usable.items() if n)
            raise BadOffer(
                f"the offer has {count} {media} m-line(s); this endpoint takes at most {allowed}"
            )
    audio = next((m.direction for m in description.media if m.kind == "audio"), None)
    video = next((m.direction for m in description.media if m.kind == "video"), None)
    offer = Offer(
        sends_audio=audio in SENDS,
        receives_audio=audio in RECEIVES,
        receives_video=video in RECEIVES,
    )
    if kind in (CALLER, INGEST) and not offer.sends_audio:
        raise BadOffer("the offer must send an audio track (the microphone)")
    if kind in (CALLER, PUSHER) and not offer.receives_video:
        raise BadOffer("the offer must receive a video track (add a recvonly video transceiver)")
    if kind == PUSHER and not any(m.kind == "application" for m in description.media):
        raise BadOffer('a pushed-audio offer needs its data channels (labelled "audio" and '
                       '"events")')  # fmt: skip
    if kind == VIEWER and (not offer.receives_video or audio in ("sendonly", "sendrecv")):
        raise BadOffer("a viewer's offer must receive video (recvonly) and send nothing")
    return offer


def for_ice(sdp: str) -> str:
    """The offer as aioice should see it: with mDNS candidates, no end-of-candidates."""
    if not MDNS_CANDIDATE.search(sdp):
        return sdp
    return re.sub(r"^a=end-of-candidates\r?\n", "", sdp, flags=re.MULTILINE)
