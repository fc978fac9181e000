# lipsync: the real-time lip-sync server, on CPU or an NVIDIA GPU.
#
#   docker build -t lipsync .
#   docker run --network host -v lipsync-weights:/weights lipsync            # CPU, one process
#   docker run --network host --gpus all -v lipsync-weights:/weights lipsync # NVIDIA GPU
#
# Host networking: aiortc picks random UDP ports for media and cannot be pinned to a range, so
# a bridged container cannot publish them. Without host networking, relay media through TURN
# (see docker-compose.yml and the README).
FROM python:3.11-slim

# OpenCV (pulled in by face-alignment) needs these shared libraries at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# PyTorch first, pinned: PyPI's Linux build runs on the CPU and on NVIDIA GPUs alike.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY wav2lip wav2lip
COPY rtc_server rtc_server
COPY signaling signaling
COPY client client
RUN pip install --no-cache-dir .

# Weights live on a volume: fetched once (`lipsync weights fetch`, or at the first start),
# kept across container upgrades.
ENV LIPSYNC_CACHE=/weights
VOLUME /weights
EXPOSE 8080
# `docker run ... lipsync` serves in one process; the compose file runs `gateway` and `worker`.
ENTRYPOINT ["lipsync"]
CMD ["serve", "--host", "0.0.0.0"]
