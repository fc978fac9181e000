#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v ffprobe >/dev/null || need+=(ffmpeg)
command -v chromium >/dev/null || need+=(chromium)
command -v turnserver >/dev/null || need+=(coturn)
command -v redis-server >/dev/null || need+=(redis-server)
command -v firefox-esr >/dev/null || need+=(firefox-esr)
command -v whip-client >/dev/null || need+=(simple-whip-client)
command -v gcc >/dev/null || need+=(gcc)
# GStreamer's webrtcbin for Debian's own python3, as a third-party peer (tests/gst_peer.py).
/usr/bin/python3 -c "import gi; gi.require_version('GstWebRTC', '1.0')" 2>/dev/null \
    && gst-inspect-1.0 avdec_h264 >/dev/null 2>&1 \
    || need+=(python3-gi gir1.2-gst-plugins-bad-1.0 gstreamer1.0-plugins-bad gstreamer1.0-nice
              gstreamer1.0-plugins-good gstreamer1.0-plugins-base gstreamer1.0-libav
              gstreamer1.0-tools)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

bash scripts/setup.sh
. .venv/bin/activate

# The suite includes ruff's lint and format checks and mypy (tests/test_style.py).
python -m pytest -q -rs "$@"
