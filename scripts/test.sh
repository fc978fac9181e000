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
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

bash scripts/setup.sh
. .venv/bin/activate

# The suite includes ruff's lint and format checks and mypy (tests/test_style.py).
python -m pytest -q -rs "$@"
