#!/usr/bin/env bash
# The GPU checks, prepared for a lent machine that reaches no package registry (issues 12, 15).
#
# Here, once:  bash bench/gpu.sh wheels
#   puts in .whl/ (ignored by git) the wheels the machine's image lacks, for its Python 3.12,
#   and a speech recording (that machine has no espeak-ng).
# There, in two device calls with carry [".whl"] and timeout_s 600 (device time is 15 minutes):
#   bash bench/gpu.sh run one    installs them, runs the CUDA tests, then the benchmark with
#                                one server process (the mouth's age at 25 fps, issue 15);
#   bash bench/gpu.sh run many   four worker processes behind one front door, 40 sessions
#                                (issue 12), the peers counting video frames undecoded.
# Results go to $OUT: each call writes at most the eight files a device call brings back.
#
# SESSIONS_ONE, SESSIONS_MANY, WORKERS and DEVICE change the sizes and the device; DEVICE=cpu
# SKIP_INSTALL=1 PYTHON=.venv/bin/python with small sizes runs the same steps here, to check
# the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    mkdir -p .whl
    # The versions this project is tested with; the image has the rest (torch, numpy, OpenCV,
    # ONNX Runtime, aiohttp, scikit-image, prometheus-client, pytest, and what librosa needs:
    # numba, joblib, scikit-learn, lazy-loader, msgpack; tqdm, psutil, requests).
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        aiortc==1.16.0 aioice==0.13.0 av==18.1.0 pylibsrtp==1.0.0 pyee==13.0.1 \
        google-crc32c==1.9.0 cryptography==50.0.2 pyOpenSSL==26.4.0 dnspython==2.9.2 \
        ifaddr==0.2.0 redis==8.1.0 librosa==0.11.0 soxr==1.0.0 soundfile==0.13.1 \
        audioread==3.1.0 pooch==1.9.0 decorator==5.3.1 dlib-bin==20.0.1.post1 \
        face_alignment==1.5.0 cffi==2.1.1 pycparser==3.12 platformdirs==4.14.9
    espeak-ng -w .whl/speech.wav "The quick brown fox jumps over the lazy dog. \
        She sells sea shells by the sea shore, and the shells she sells are surely seashells."
    du -sh .whl
}

run() {
    local part=$1 out=${OUT:-/tmp/gpu-out} py=${PYTHON:-python3} device=${DEVICE:-cuda}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    if [ -z "${SKIP_INSTALL:-}" ]; then
        timeout 60 "$py" -m pip install -q --no-index --no-deps .whl/*.whl \
            || { echo "the wheels did not install" >&2; exit 1; }
    fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; nproc; } \
        >"$out/machine.txt" 2>&1
    local photo
    photo=$("$py" -c 'import pathlib, skimage.data as d; print(pathlib.Path(d.__file__).parent / "astronaut.png")')
    local common=(--device "$device" --photo "$photo" --speech .whl/speech.wav --seconds 10)
    [ "$device" = cuda ] && common+=(--batch 16)
    # The benchmark writes latest.md and latest.json after each count of sessions (what was
    # measured stays, should the time run out) and server.log; its own output ends with its
    # tables, or with its error. The limits add up to 12 minutes, of the 15 a session has.
    if [ "$part" = one ]; then
        # The CUDA tests (CUDA graphs against eager, half precision): skipped on a CPU.
        timeout 90 "$py" -m pytest -q -p no:cacheprovider tests/test_engine.py \
            -k "cuda or half" >"$out/cuda-tests.log" 2>&1
        tail -5 "$out/cuda-tests.log"
        # Issue 15: the mouth's age at 25 fps on the GPU, one server process.
        timeout 270 "$py" -m bench.run "${common[@]}" --peer-processes 4 \
            --sessions ${SESSIONS_ONE:-1 8} --out "$out/one" 2>&1 | tail -6
    else
        # Issue 12: 40 sessions, every frame inferred, on four workers sharing the GPU.
        timeout 300 "$py" -m bench.run "${common[@]}" --peer-processes 8 \
            --peers-skip-video-decoding --workers "${WORKERS:-4}" \
            --sessions ${SESSIONS_MANY:-40} --out "$out/many" 2>&1 | tail -5
    fi
}

case "${1:-}" in
    wheels) wheels ;;
    run)
        if [ "${2:-}" != one ] && [ "${2:-}" != many ]; then
            echo "usage: bash bench/gpu.sh run one|many" >&2
            exit 2
        fi
        run "$2"
        ;;
    *) echo "usage: bash bench/gpu.sh wheels | run one|many" >&2; exit 2 ;;
esac
