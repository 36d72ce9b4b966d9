"""Measuring tools of ``pst-yolo bench``: round-robin timing on a wall or CPU clock, peak tensor memory, and a dense
GEMM as the throughput reference."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin_samples(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds of each timed call of each variant, in round order, calling every variant once per round
    (round-robin) for ``warmup`` untimed rounds and then ``repeats`` timed ones, so load from other processes hits
    every variant alike and round ``i`` of two variants can be compared pairwise.

    ``clock="cpu"`` measures the process's CPU time instead of wall time: with one thread it is the compute time,
    and time spent waiting while other processes hold the cores does not count (use it on a shared machine).
    """
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + repeats):
        for name, fn in variants.items():
            synchronize(device)
            start = now()
            fn()
            synchronize(device)
            if round_index >= warmup:
                times[name].append((now() - start) * 1e3)
    return times


def time_round_robin(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, float]:
    """Median milliseconds per call of each variant over the rounds of :func:`round_robin_samples`."""
    samples = round_robin_samples(variants, repeats, warmup, device, clock)
    return {name: statistics.median(t) for name, t in samples.items()}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the ``with`` block and alive at the same time.

    Every aten op's outputs are recorded unless they share storage with its inputs (views, in-place ops); a
    recorded storage stops counting once it has been freed, which is checked before each new op's outputs count.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.live if r.expired()]:
            self.current -= self.live.pop(ref)
        inputs = {self._ref(t) for t in tree_leaves((args, kwargs)) if self._counts(t)}
        for t in tree_leaves(out):
            ref = self._ref(t) if self._counts(t) else None
            if ref is not None and ref not in inputs and ref not in self.live:
                self.live[ref] = t.untyped_storage().nbytes()
                self.current += self.live[ref]
        self.peak = max(self.peak, self.current)
        return out

    @staticmethod
    def _counts(t) -> bool:
        return isinstance(t, torch.Tensor) and t.layout == torch.strided

    @staticmethod
    def _ref(t: torch.Tensor) -> StorageWeakRef:
        return StorageWeakRef(t.untyped_storage())


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MB of tensor memory that ``fn`` allocates above what already exists (its result included)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with LiveTensorBytes() as probe:
        fn()
    return probe.peak / 2**20


def gemm_call(device: torch.device, size: int, dtype: torch.dtype) -> tuple[Callable[[], object], int]:
    """A size x size by size x size matrix product in ``dtype`` on seeded random matrices, and its FLOPs, to time
    alone or in the same rounds as the kernels it is compared with."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    return (lambda: a @ b), 2 * size**3


def gemm_gflops(device: torch.device, size: int, repeats: int, clock: str = "wall") -> float:
    """Throughput of one large fp32 matrix product (size x size by size x size, :func:`gemm_call`), GFLOP/s."""
    call, flops = gemm_call(device, size, torch.float32)
    ms = time_round_robin({"gemm": call}, repeats, 1, device, clock)["gemm"]
    return flops / (ms * 1e-3) / 1e9
