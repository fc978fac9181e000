#!/usr/bin/env bash
# Set up .venv and run the server (http://127.0.0.1:8080 by default). Extra arguments go to
# `lipsync serve`, e.g. `bash scripts/serve.sh --host 0.0.0.0 --offline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lipsync serve "$@"
