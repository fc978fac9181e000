#!/usr/bin/env bash
# Create .venv and install the project into it. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    # Debian and Ubuntu ship venv separately.
    if ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: a bare "torch" requirement would pull the newest CUDA build (several GB).
# For a CPU-only build elsewhere, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0" \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install --quiet -e ".[test]"
