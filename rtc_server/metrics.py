"""A media worker's Prometheus metrics: sessions, frames, the age of the mouth shown, inference.

Each worker has its own registry (several may run in one test process), served as Prometheus'
text format at /metrics by `prometheus_client`. Labels are few and fixed: none but the refusal
reason, so a scrape stays the same size however many sessions come and go.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The age of the mouth on screen: a fresh frame's is the delay (about 0.3 s); each repeat adds
# 40 ms. The buckets cover both, up to a second and a half of frozen face.
AGE_BUCKETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)
# A batch's inference: 0.1 ms on a GPU to 100 ms on a small CPU.
BATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5)


class MediaMetrics:
    """What a worker counts; `registry` is what /metrics serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.sessions_live = Gauge("lipsync_sessions_live", "Sessions running", registry=registry)
        self.sessions_started = Counter(
            "lipsync_sessions_started", "Sessions started", registry=registry
        )
        self.sessions_refused = Counter(
            "lipsync_sessions_refused",
            "Sessions refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.frames_delivered = Counter(
            "lipsync_frames_delivered", "Video frames sent to peers", registry=registry
        )
        self.frames_inferred = Counter(
            "lipsync_frames_inferred",
            "Frames sent with a freshly inferred mouth",
            registry=registry,
        )
        self.frames_repeated = Counter(
            "lipsync_frames_repeated",
            "Frames sent again because the next one was not ready",
            registry=registry,
        )
        self.mouth_age = Histogram(
            "lipsync_mouth_age_seconds",
            "Time from the arrival of the audio a shown mouth was inferred for to its sending",
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "lipsync_inference_batch_seconds",
            "Inference time of one batch of frames",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )

    def frame_sent(self, fresh: bool, mouth_age: float) -> None:
        self.frames_delivered.inc()
        (self.frames_inferred if fresh else self.frames_repeated).inc()
        self.mouth_age.observe(mouth_age)
