"""CUDA graphs for the static-shape steps of inference: the encoder on a few images, and greedy decoding.

Why: on a GPU a single photo is almost all launch overhead. MobileNetV2 is ~150 kernels and a greedy word
~15, each launched from Python, so ``caption(path)`` took 12-17 ms on an H200 for about 1 ms of GPU work
(benchmarks/README.md). A CUDA graph records a function's kernels once per input shape and replays them
with one launch. Greedy decoding is recorded whole, all ``max_len`` steps (``decoding.greedy_static``:
no early exit, no host synchronisation), so a caption is one replay and one copy back.

Shapes are bucketed: the rows of a call are rounded up to a power of two and padded with zeros, so a few
graphs serve every batch size. Rows are independent in the CNN (BatchNorm in eval mode) and in the decoder,
so padding changes no real row's result beyond the GPU libraries' choice of kernel for another row count
(the same freedom the eager path has between batch sizes).

Everything here also runs without capturing (``capture=False``, and always on a CPU): the same buffers,
padding and slicing, with the function called directly. That is how the tests check this code off a GPU.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

Fn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def bucket(rows: int) -> int:
    """The padded row count of a call: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class GraphedCall:
    """``fn(x) -> tensors with x's rows first``, replayed from one CUDA graph per (bucket, shape, dtype) of ``x``.

    ``fn`` must be free of host synchronisation and of data-dependent shapes (it is recorded once). Calls with
    more than ``max_rows`` rows run ``fn`` directly. Replays share buffers, so a lock makes each call's copy in,
    replay and copy out one step (the app serves requests from several threads). If recording fails, a warning
    says why and every later call runs ``fn`` directly: a GPU or driver without graph support still captions.
    """

    def __init__(self, fn: Fn, max_rows: int, capture: bool = True) -> None:
        self.fn, self.max_rows = fn, max_rows
        self.capture = capture
        self.failed: str | None = None
        self.replays = 0
        self._entries: dict[tuple, tuple[torch.Tensor, tuple[torch.Tensor, ...], object]] = {}
        self._pool = None
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = x.shape[0]
        if rows == 0 or rows > self.max_rows or self.failed:
            return self.fn(x)
        with self._lock:
            key = (bucket(rows), tuple(x.shape[1:]), x.dtype, x.device)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._record(key)
                if entry is None:
                    return self.fn(x)
            static_in, static_out, graph = entry
            static_in[:rows].copy_(x)
            static_in[rows:].zero_()
            if graph is None:
                static_out = self.fn(static_in)
            else:
                graph.replay()
                self.replays += 1
            return tuple(out[:rows].clone() for out in static_out)

    def _record(self, key: tuple):
        rows, shape, dtype, device = key
        static_in = torch.zeros((rows, *shape), dtype=dtype, device=device)
        if not (self.capture and device.type == "cuda"):
            entry = (static_in, (), None)
        else:
            try:
                entry = (static_in, *self._capture(static_in))
            except Exception as err:  # any capture failure: fall back to eager calls, said once
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture failed; running eagerly ({self.failed[:300]})", RuntimeWarning)
                return None
        self._entries[key] = entry
        return entry

    def _capture(self, static_in: torch.Tensor):
        """Warm up on a side stream (library handles, autotuning), then record (torch.cuda.graphs' recipe)."""
        side = torch.cuda.Stream(static_in.device)
        side.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(static_in)
        torch.cuda.current_stream(static_in.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all of this call's graphs
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call CUDA meanwhile (stream's first flush)
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        return static_out, graph
