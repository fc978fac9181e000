"""Engines that fail or crawl on purpose, and a way to serve one in a real server process.

`python -m tests.faulty --port P --fail-after N` runs `signaling.server.serve`, exactly as
`lipsync serve --offline` does, with an animator whose inference raises from call N+1 on
(N = 0: already during the warm-up).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from wav2lip.animator import Animator


class FailingAnimator(Animator):
    """The animator, until `fail_after` inferences have run; then every one raises."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after
        self.calls = 0

    def infer(self, face: Any, mels: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (a test)")
        return super().infer(face, mels)


class SlowAnimator(Animator):
    """The animator, taking `seconds` a frame: a device that makes 1 / seconds frames/s."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def infer(self, face: Any, mels: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds * len(mels))
        return super().infer(face, mels)


def main() -> int:
    from signaling.config import ServerConfig
    from signaling.server import serve

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-after", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = ServerConfig(offline=True, port=args.port, min_fps=0)
    return serve(config, engine=FailingAnimator(args.fail_after))


if __name__ == "__main__":
    sys.exit(main())
