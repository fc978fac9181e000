"""A peer built on GStreamer's webrtcbin, as a third-party client would be.

Run with Debian's python3 and its PyGObject (not the project's virtualenv):

    /usr/bin/python3 tests/gst_peer.py URL CODEC SECONDS

It sends a tone as the microphone (Opus), receives the lip-synced video in CODEC (VP8 or H264)
and the returned audio, decodes both, and prints one JSON line: the frames and audio buffers
it decoded after the connection came up, over SECONDS, and the video's size. webrtcbin's DTLS
certificate is RSA, which aiortc alone could not take (rtc_server/dtls.py).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

SOURCE = (
    "webrtcbin name=rtc bundle-policy=max-bundle "
    "audiotestsrc is-live=true wave=sine freq=300 volume=0.4 ! audioconvert ! audioresample "
    "! opusenc ! rtpopuspay pt=111 "
    "! application/x-rtp,media=audio,encoding-name=OPUS,payload=111 ! rtc."
)


def main() -> None:
    url, codec, seconds = sys.argv[1], sys.argv[2].upper(), float(sys.argv[3])
    Gst.init(None)
    pipeline = Gst.parse_launch(SOURCE)
    rtc = pipeline.get_by_name("rtc")
    loop = GLib.MainLoop()
    found: dict[str, object] = {
        "video_frames": 0,
        "audio_buffers": 0,
        "width": 0,
        "height": 0,
        "error": None,
    }
    connected_at: list[float] = []
    video_times: list[float] = []

    def count(kind: str):
        def probe(pad, info):
            if connected_at:
                if kind == "video":
                    found["video_frames"] += 1
                    video_times.append(time.monotonic())
                    structure = pad.get_current_caps().get_structure(0)
                    found["width"] = structure.get_value("width")
                    found["height"] = structure.get_value("height")
                else:
                    found["audio_buffers"] += 1
            return Gst.PadProbeReturn.OK

        return probe

    def on_decoded(decodebin, pad):
        kind = "video" if pad.get_current_caps().to_string().startswith("video") else "audio"
        convert = Gst.ElementFactory.make("videoconvert" if kind == "video" else "audioconvert")
        sink = Gst.ElementFactory.make("fakesink")
        sink.set_property("sync", False)
        for element in (convert, sink):
            pipeline.add(element)
            element.sync_state_with_parent()
        pad.link(convert.get_static_pad("sink"))
        convert.link(sink)
        sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, count(kind))

    def on_incoming(_, pad):
        if pad.direction != Gst.PadDirection.SRC:
            return
        decodebin = Gst.ElementFactory.make("decodebin")
        decodebin.connect("pad-added", on_decoded)
        pipeline.add(decodebin)
        decodebin.sync_state_with_parent()
        pad.link(decodebin.get_static_pad("sink"))

    def send_offer() -> None:
        offer = rtc.get_property("local-description").sdp.as_text()
        body = json.dumps({"sdp": offer, "type": "offer"}).encode()
        request = urllib.request.Request(
            f"{url}/api/sessions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            found["error"] = f"offer refused: {exc.code} {exc.read().decode()}"
            loop.quit()
            return
        except Exception as exc:  # report it, whatever it is, in the JSON line
            found["error"] = f"offer refused: {exc}"
            loop.quit()
            return
        _, message = GstSdp.SDPMessage.new_from_text(answer["sdp"])
        description = GstWebRTC.WebRTCSessionDescription.new(
            GstWebRTC.WebRTCSDPType.ANSWER, message
        )
        rtc.emit("set-remote-description", description, Gst.Promise.new())

    def on_gathering(*_):
        if rtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            GLib.idle_add(lambda: send_offer() and False)

    def on_offer(promise, _):
        reply = promise.get_reply()  # held while its offer is used: it owns the offer's SDP
        rtc.emit("set-local-description", reply.get_value("offer"), Gst.Promise.new())

    def make_offer() -> bool:
        # Not on "on-negotiation-needed": that comes as each transceiver appears, and an offer
        # made before the microphone's caps are known has no SDP.
        rtc.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer, None))
        return False  # once

    def on_connection(*_):
        state = rtc.get_property("connection-state")
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED and not connected_at:
            connected_at.append(time.monotonic())
            GLib.timeout_add(int(seconds * 1000), loop.quit)
        elif state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            found["error"] = "the connection failed"
            loop.quit()

    def on_message(_, message):
        if message.type == Gst.MessageType.ERROR:
            found["error"] = message.parse_error()[0].message
            loop.quit()

    caps = f"application/x-rtp,media=video,encoding-name={codec},payload=96,clock-rate=90000"
    if codec == "H264":  # what aiortc sends, as browsers offer it: non-interleaved, baseline
        caps += ",packetization-mode=(string)1,profile-level-id=(string)42e01f"
    rtc.emit(
        "add-transceiver",
        GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
        Gst.Caps.from_string(caps),
    )
    rtc.connect("pad-added", on_incoming)
    rtc.connect("notify::ice-gathering-state", on_gathering)
    rtc.connect("notify::connection-state", on_connection)
    bus = pipeline.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_message)
    GLib.timeout_add(int((seconds + 30) * 1000), loop.quit)  # never hang
    pipeline.set_state(Gst.State.PLAYING)
    GLib.timeout_add(500, make_offer)
    loop.run()
    found["seconds"] = time.monotonic() - connected_at[0] if connected_at else 0.0
    if len(video_times) > 1:
        found["video_fps"] = (len(video_times) - 1) / (video_times[-1] - video_times[0])
    pipeline.set_state(Gst.State.NULL)
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
