"""The decoder replayed as CUDA graphs, one per batch size.

At the batch sizes a server runs (one to a few dozen frames), each of the decoder's hundred or
so kernels is too short to fill a large GPU, and launching them one by one from Python can take
longer than running them. A CUDA graph records the launches once and replays them in one call.
A graph works on fixed buffers, so a batch is copied into the buffers of the smallest recorded
size that holds it; the rows beyond the batch are computed and ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Decode = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
WARM_UP_RUNS = 3  # cuDNN picks its algorithms before the graph records them


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    mel: torch.Tensor
    terms: list[torch.Tensor]
    out: torch.Tensor


def bucket(batch: int) -> int:
    """The recorded size a batch runs at: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


class GraphedDecoder:
    """`decode(mel, terms)` with the same results, replayed from graphs recorded lazily."""

    def __init__(self, decode: Decode, mel_shape: tuple[int, ...], max_batch: int = 64) -> None:
        self._decode = decode
        self._mel_shape = mel_shape  # one window's shape: (1, 80, 16)
        self.max_batch = max_batch
        self._graphs: dict[int, _Graph] = {}

    def __call__(self, mel: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
        batch = mel.shape[0]
        if batch > self.max_batch:
            return self._decode(mel, terms)
        size = bucket(batch)
        recorded = self._graphs.get(size) or self._record(size, mel, terms)
        recorded.mel[:batch].copy_(mel)
        for buffer, term in zip(recorded.terms, terms):
            buffer[:batch].copy_(term)  # a (1, ...) term is broadcast over the batch
        recorded.graph.replay()
        return recorded.out[:batch]

    def _record(self, size: int, mel: torch.Tensor, terms: list[torch.Tensor]) -> _Graph:
        static_mel = mel.new_zeros((size, *self._mel_shape))
        static_terms = [term.new_zeros((size, *term.shape[1:])) for term in terms]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                self._decode(static_mel, static_terms)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a new photo's terms) may use CUDA meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._decode(static_mel, static_terms)
        recorded = _Graph(graph, static_mel, static_terms, out)
        self._graphs[size] = recorded
        return recorded
