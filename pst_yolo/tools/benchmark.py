"""Benchmarks: the PSA op, its score step, whole models (PyTorch and ONNX Runtime) and a training step.

    pst-yolo bench                                   # CPU defaults: under 10 minutes on 2 cores
    pst-yolo bench --device cuda --model-batches 1 16
    pst-yolo bench --threads 1 --clock cpu           # on a shared CPU: compute time, not time spent waiting
    pst-yolo bench --quick --out /tmp/bench          # tiny smoke run

Timing: each table's variants run round-robin (one call of each per round) after warm-up, so load from other
processes hits every variant alike; tables give medians. Peak memory: on CUDA the allocator's peak above the
starting point; on CPU the peak of live tensor bytes, tracked by a dispatch mode that sees every tensor an aten op
returns and notices when its storage is freed (kernel-internal scratch, such as the CPU SDPA kernel's per-thread
blocks, is not seen). The targets of the project are printed as ratios measured in the same run. Writes
``bench.md``, ``bench.json`` and ``bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..validation import argparse_type, check_int

HEAD_DIM = 32
TOPKS = (0, 8, 16, 32)
OP_SIZES = (320, 640, 1280)
BACKENDS = ("naive", "sdpa", "flash", "sage")  # concrete attention backends; --model-backends also takes "auto"
MODELS = ("yolo12n", "yolo11n", "yolo11n-pst", "yolo12n-pst", "yolo11s", "yolo11s-pst")
TARGET_SHAPE = (640, "P3")  # the op target: 80x80 queries over 40x40 keys, 1 head
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SCORE_DENSE = "dense N x M softmax"
SCORE_FUSED = "blocked fused pass (naive)"
SCORE_SDPA = "sdpa backend (CPU: the fused blocked pass)"
COARSE_PASS = "eq. 2+3 pass"  # op row: the coarse output and the exact eq. 3 scores, as the op runs them at k > 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pst-yolo bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def count(name: str, minimum: int = 1, multiple_of: int = 1):
        """argparse type: an integer >= minimum (and a multiple of ``multiple_of``), errors naming the option."""
        convert = argparse_type(check_int, name, minimum=minimum)

        def checked(text: str) -> int:
            value = convert(text)
            if value % multiple_of:
                raise argparse.ArgumentTypeError(f"{name} must be a multiple of {multiple_of}, got {value}.")
            return value

        checked.__name__ = name
        return checked

    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output directory")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=count("threads"), default=len(os.sched_getaffinity(0)), help="CPU threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (shared CPU)")
    parser.add_argument("--repeats", type=count("repeats"), default=10, help="timed rounds per table")
    parser.add_argument("--warmup", type=count("warmup", 0), default=2, help="untimed rounds first")
    parser.add_argument(
        "--op-sizes", type=count("op-sizes", 32, 16), nargs="+", default=list(OP_SIZES), help="op input sizes"
    )
    parser.add_argument("--topks", type=count("topks", 0), nargs="+", default=list(TOPKS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="usable ones run")
    parser.add_argument("--naive-max-size", type=count("naive-max-size", 0), default=640, help="skip naive above this")
    parser.add_argument("--score-batch", type=count("score-batch"), default=8, help="batch of the score-step table")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="YAML names without .yaml")
    parser.add_argument("--imgsz", type=count("imgsz", 32, 32), default=640, help="model input size")
    parser.add_argument("--model-batches", type=count("model-batches"), nargs="+", default=[1], help="e.g. 1 16")
    parser.add_argument("--model-topk", type=count("model-topk", 0), default=8, help="PST models' top-k (and 0)")
    parser.add_argument("--model-backends", nargs="+", choices=("auto", *BACKENDS), default=["auto", "naive"])
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even when installed")
    parser.add_argument("--train-batch", type=count("train-batch"), default=8)
    parser.add_argument("--train-imgsz", type=count("train-imgsz", 32, 32), default=320)
    parser.add_argument("--train-steps", type=count("train-steps"), default=8, help="timed steps per model")
    parser.add_argument(
        "--train-processes",
        type=count("train-processes"),
        help="fresh processes the training section runs in, one after the other (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--model-processes",
        type=count("model-processes"),
        help="fresh processes the model-latency target ratios are timed in (default 5, 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if not model_yaml_exists(name)]
    if unknown:
        parser.error(f"argument --models: no model YAML for {', '.join(unknown)} (give names like yolo11n-pst).")
    if args.quick:
        args.repeats, args.warmup, args.op_sizes, args.topks = 2, 1, [64], [0, 8]
        args.score_batch, args.models, args.imgsz, args.model_batches = 1, ["yolo12n", "yolo11n-pst"], 64, [1]
        args.train_batch, args.train_imgsz, args.train_steps = 2, 64, 1
    if args.train_processes is None:
        args.train_processes = 1 if args.quick else 3
    if args.model_processes is None:
        args.model_processes = 1 if args.quick else 5
    return args


def device_name(text: str) -> str:
    """argparse type: a torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got '{text}'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device '{text}' asked for, but CUDA is not available here.")
    return text


def model_yaml_exists(name: str) -> bool:
    """Whether ``<name>.yaml`` resolves (as ``DetectionModel`` resolves it) to a stock or a shipped model YAML."""
    from ultralytics.nn.tasks import yaml_model_load

    import pst_yolo  # noqa: F401  (finds the shipped YAMLs by short name)

    try:
        yaml_model_load(f"{name}.yaml")
    except FileNotFoundError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- measuring tools
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds of each variant in every timed round, calling every variant once per round (round-robin).

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
    """Median milliseconds per call of each variant, timed as :func:`time_rounds` does."""
    return medians(time_rounds(variants, repeats, warmup, device, clock))


def medians(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Name -> median of its times, for :func:`time_rounds` results."""
    return {name: statistics.median(t) for name, t in rounds.items()}


def median_over_rounds(rounds: dict[str, list[float]], of_round: Callable[[dict[str, float]], float]) -> float:
    """Median over the rounds of :func:`time_rounds` of ``of_round`` (one round's name -> ms, e.g. a ratio of two
    variants).

    A ratio taken within each round compares calls made moments apart: a slower stretch of a shared machine that
    spans the round slows both and cancels, where it moves the ratio of the two medians. YOLO11n-PST k=8 / k=0 in
    eight 10-round blocks on the 2-core VM of runs U to X (``scripts/round_ratios.py``): standard deviation 0.022
    within rounds against 0.032 of the medians with 1 thread, 0.043 against 0.108 with 2 (docs/BENCHMARKS.md).
    """
    count = len(next(iter(rounds.values())))
    return statistics.median(of_round({name: times[i] for name, times in rounds.items()}) for i in range(count))


def ratio_of(numerator: str, denominator: str) -> Callable[[dict[str, float]], float]:
    """One round's ``numerator`` time / ``denominator`` time, for :func:`median_over_rounds`."""
    return lambda ms: ms[numerator] / ms[denominator]


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


def in_fresh_processes(count: int, fn: Callable, *args) -> list:
    """``fn(*args)`` in ``count`` fresh (spawned) processes, one after the other; their results in run order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    results = []
    for _ in range(count):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(fn, *args).result())
    return results


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


# ---------------------------------------------------------------------------------------------------- the op
def op_shapes(imgsz: int) -> list[dict]:
    """PSA shapes of an N-scale model at ``imgsz``: P3 (C'=32, 1 head) and P4 (C'=64, 2 heads), upper = half."""
    return [
        {"level": "P3", "fine_hw": (imgsz // 8, imgsz // 8), "heads": 1},
        {"level": "P4", "fine_hw": (imgsz // 16, imgsz // 16), "heads": 2},
    ]


def psa_inputs(batch: int, heads: int, fine_hw: tuple[int, int], device, dtype) -> tuple[list[torch.Tensor], tuple]:
    """Random q, k, v (coarse), k_fine, v_fine: (batch, heads, tokens, 32) each, and the coarse grid."""
    coarse_hw = ((fine_hw[0] + 1) // 2, (fine_hw[1] + 1) // 2)
    n, m = fine_hw[0] * fine_hw[1], coarse_hw[0] * coarse_hw[1]
    g = torch.Generator(device=device).manual_seed(0)
    sizes = (n, m, m, n, n)
    return [torch.randn(batch, heads, s, HEAD_DIM, device=device, dtype=dtype, generator=g) for s in sizes], coarse_hw


def op_flops(batch: int, heads: int, n: int, m: int, topk: int) -> int:
    """Matmul FLOPs of the op: coarse q k^T and p v, the eq. 3 score pass's q k^T, fine attention over 4k tokens."""
    per_head = 4 * n * m * HEAD_DIM
    if topk:
        per_head += 2 * n * m * HEAD_DIM + 4 * n * 4 * min(topk, m) * HEAD_DIM
    return batch * heads * per_head


def usable_backends(
    names: list[str], device: torch.device, dtype: torch.dtype, kv_len: int | None = None
) -> list[str]:
    """The backends of ``names`` that can run inference on ``dtype`` tensors of ``device`` with ``kv_len`` keys
    (None: any key count a model may give, as ``auto`` resolves per layer)."""
    from ..ops.backends import unusable_reason

    probe = torch.zeros(1, 1, 1, HEAD_DIM, device=device, dtype=dtype)
    return [b for b in names if unusable_reason(b, probe, needs_grad=False, kv_len=kv_len) is None]


def bench_op(args, device, dtype, gemm: float) -> list[dict]:
    """Latency, peak memory and throughput of ``pyramid_sparse_attention`` per size, level, backend and top-k."""
    from ..ops import attention, coarse_attention_with_scores, pyramid_sparse_attention

    rows = []
    for imgsz in args.op_sizes:
        for shape in op_shapes(imgsz):
            (q, k, v, kf, vf), coarse_hw = psa_inputs(1, shape["heads"], shape["fine_hw"], device, dtype)
            variants = {
                ("bare sdpa", None): partial(attention, q, k, v, "sdpa"),
                (COARSE_PASS, None): partial(coarse_attention_with_scores, q, k, v, "sdpa"),
            }
            for backend in usable_backends(args.backends, device, dtype, kv_len=k.shape[2]):
                if backend == "naive" and imgsz > args.naive_max_size:
                    continue
                for topk in args.topks:
                    variants[(backend, topk)] = partial(
                        pyramid_sparse_attention,
                        q,
                        k,
                        v,
                        kf,
                        vf,
                        shape["fine_hw"],
                        coarse_hw,
                        topk=topk,
                        backend=backend,
                    )
            with torch.inference_mode():
                ms = time_round_robin(variants, args.repeats, args.warmup, device, args.clock)
                mb = {key: peak_memory_mb(fn, device) for key, fn in variants.items()}
            bare_ms, bare_mb = ms[("bare sdpa", None)], mb[("bare sdpa", None)]
            n, m = q.shape[2], k.shape[2]
            for (backend, topk), t in ms.items():
                gflops = op_flops(1, shape["heads"], n, m, topk or 0) / (t * 1e-3) / 1e9
                rows.append(
                    {
                        "imgsz": imgsz, "level": shape["level"], "fine": f"{shape['fine_hw'][0]}x{shape['fine_hw'][1]}",
                        "coarse": f"{coarse_hw[0]}x{coarse_hw[1]}", "heads": shape["heads"], "backend": backend,
                        "topk": topk, "ms": t, "peak_mb": mb[(backend, topk)], "x_sdpa_ms": t / bare_ms,
                        "x_sdpa_mem": mb[(backend, topk)] / bare_mb, "gflops": gflops, "gemm_fraction": gflops / gemm,
                    }
                )  # fmt: skip
            print(f"op {imgsz} {shape['level']}: " + ", ".join(f"{b}/k={t}: {v:.2f} ms" for (b, t), v in ms.items()))
    return rows


def bench_score_step(args, device, dtype) -> list[dict]:
    """Eq. 2 + eq. 3 at 640 P3 (80x80 over 40x40, 1 head) and batch ``score_batch``: time and peak memory.

    Variants: the dense matrix (what a plain implementation holds), the fused blocked pass (``naive`` backend), the
    ``sdpa`` backend's path (on CPU the same fused pass; on CUDA the SDPA kernel plus a blocked score pass), and the
    SDPA kernel plus a blocked pass that recomputes the softmax.
    """
    from ..ops import attention, coarse_attention_with_scores, coarse_key_scores
    from ..ops.pyramid_sparse_attention import blocked_attention_with_scores

    (q, k, v, _, _), _ = psa_inputs(args.score_batch, 1, (args.imgsz // 8, args.imgsz // 8), device, dtype)

    def dense():
        probs = (q @ k.transpose(-2, -1) * HEAD_DIM**-0.5).softmax(dim=-1)  # (B, 1, N, M)
        return probs @ v, probs.float().mean(dim=2)

    variants = {
        SCORE_DENSE: dense,
        SCORE_FUSED: lambda: blocked_attention_with_scores(q, k, v),
        SCORE_SDPA: lambda: coarse_attention_with_scores(q, k, v, "sdpa"),
        "SDPA + softmax score pass": lambda: (attention(q, k, v, "sdpa")[0], coarse_key_scores(q, k)),
    }
    with torch.inference_mode():
        ms = time_round_robin(variants, max(2, args.repeats // 3), 1, device, args.clock)
        mb = {name: peak_memory_mb(fn, device) for name, fn in variants.items()}
    print("score step: " + ", ".join(f"{n}: {ms[n]:.1f} ms {mb[n]:.1f} MB" for n in variants))
    return [
        {"variant": n, "batch": args.score_batch, "ms": ms[n], "peak_mb": mb[n], "x_dense_mem": mb[n] / mb[SCORE_DENSE]}
        for n in variants
    ]


# ------------------------------------------------------------------------------------------------- the models
def build_model(name: str, device: torch.device):
    """Untrained detection model from ``<name>.yaml`` (stock Ultralytics or pst_yolo's), fused, eval, on device."""
    from ultralytics.nn.tasks import DetectionModel

    import pst_yolo  # noqa: F401  (registers the PST modules and configs)

    return DetectionModel(f"{name}.yaml", verbose=False).fuse(verbose=False).eval().to(device)


def is_pst(model: torch.nn.Module) -> bool:
    from ..nn import PSAttn

    return any(isinstance(m, PSAttn) for m in model.modules())


def model_variants(names: list[str], topk: int, backends: list[str], device) -> dict[str, tuple]:
    """Label -> (fused eval model, top-k or None for stock models, attention backend).

    PST models run at top-k 0 and at ``topk`` with the default backend, and at ``topk`` with each other backend.
    """
    variants = {}
    for name in names:
        model = build_model(name, device)
        if not is_pst(model):
            variants[name] = (model, None, "auto")
            continue
        variants[f"{name} k=0"] = (model, 0, "auto")
        for backend in backends:
            variants[f"{name} k={topk}" + ("" if backend == "auto" else f" {backend}")] = (model, topk, backend)
    return variants


def forward_with_topk(model: torch.nn.Module, topk: int | None, backend: str, x: torch.Tensor) -> Callable[[], object]:
    from ..nn import set_topk
    from ..ops import use_backend

    def run():
        if topk is not None:
            set_topk(model, topk)
        with use_backend(backend):
            return model(x)

    return run


def time_models_eager(
    args, variants: dict, x: torch.Tensor, device, also: dict[str, Callable] | None = None
) -> dict[str, list[float]]:
    """ms of each variant (:func:`model_variants`) on ``x`` and of each call in ``also`` in every round
    (:func:`time_rounds`), round-robin under ``inference_mode``."""
    calls = {label: forward_with_topk(*variant[:3], x) for label, variant in variants.items()} | (also or {})
    with torch.inference_mode():
        return time_rounds(calls, args.repeats, args.warmup, device, args.clock)


def time_onnx_graphs(args, paths: dict[str, Path], feed: dict) -> dict[str, list[float]]:
    """ms of each ONNX graph in ONNX Runtime's CPU provider in every round (:func:`time_rounds`), round-robin, the
    sessions sharing this process's one pool of ``args.threads`` threads (:func:`share_onnx_thread_pool`)."""
    import onnxruntime as ort

    options = onnx_session_options(args.threads)
    sessions = {
        label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for label, path in paths.items()
    }
    calls = {label: partial(session.run, None, feed) for label, session in sessions.items()}
    return time_rounds(calls, args.repeats, args.warmup, torch.device("cpu"), args.clock)


def bench_models_eager(args, variants: dict, device) -> list[dict]:
    rows = []
    for batch in args.model_batches:
        x = torch.rand(batch, 3, args.imgsz, args.imgsz, device=device)
        ms = medians(time_models_eager(args, variants, x, device))
        rows += [{"runtime": "pytorch", "model": label, "batch": batch, "ms": t} for label, t in ms.items()]
        print(f"pytorch batch {batch}: " + ", ".join(f"{label}: {t:.1f} ms" for label, t in ms.items()))
    return rows


def export_onnx(model: torch.nn.Module, topk: int | None, x: torch.Tensor, path: Path) -> Path:
    """TorchScript ONNX export (opset 18, static shapes), the exporter Ultralytics 8.4 uses."""
    from ..nn import set_topk

    if topk is not None:
        set_topk(model, topk)
    with torch.no_grad():
        torch.onnx.export(model, x, str(path), opset_version=18, dynamo=False, input_names=["images"])
    return path


@cache
def share_onnx_thread_pool(threads: int) -> None:
    """Give this process one ONNX Runtime pool of ``threads`` intra-op threads for every session to share.

    Sessions with pools of their own slow each other when timed round-robin: after a run a session's worker threads
    spin, waiting for more work, while the next session runs. With 2 threads on 2 cores three such sessions ran
    YOLO12n at 108.6 ms (median of 5 processes), against 62.4 ms for a session timed alone and 59.6 ms with one
    shared pool (``scripts/onnx_thread_pools.py``, docs/BENCHMARKS.md). ONNX Runtime creates the pool once per
    process, so a process times with one thread count: time another in a fresh process (:func:`in_fresh_processes`).

    Call it only in a process that does nothing with ONNX Runtime but time: once the pool exists, every session made
    without ``use_per_session_threads = False`` fails. onnxslim's constant folding (Ultralytics' ``simplify=True``)
    makes such sessions and skips what fails, and it then wrote a k=8 graph whose outputs were off by 0.09.
    """
    import onnxruntime as ort

    try:
        ort.set_global_thread_pool_sizes(threads, 1)
    except Exception as error:  # onnxruntime's Fail: the pool exists, with another size (cache holds the same size)
        raise RuntimeError(
            f"This process's shared ONNX Runtime thread pool exists already with another size than {threads} threads; "
            "time ONNX graphs with another thread count in a fresh process."
        ) from error


def onnx_session_options(threads: int, profile_prefix: Path | None = None):
    """ONNX Runtime options for the pool of ``threads`` threads this process's sessions share (one inter-op thread);
    ORT's profiler on when a prefix is given."""
    import onnxruntime as ort

    share_onnx_thread_pool(threads)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return options


def onnx_scope(module_name: str) -> str:
    """The ONNX node-name prefix of a module: ``model.14.blocks.0.attn`` -> ``/model.14/blocks.0/attn/`` (the
    TorchScript exporter keeps a container's child index with the child's name)."""
    parts: list[str] = []
    for part in module_name.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def psa_scopes(model: torch.nn.Module) -> list[str]:
    """The ONNX node-name prefixes (:func:`onnx_scope`) of ``model``'s PSA attention modules."""
    from ..nn import PSAttn

    return [onnx_scope(name) for name, module in model.named_modules() if isinstance(module, PSAttn)]


ATTENTION_NODES = ("MatMul", "FusedMatMul", "Softmax")  # q k^T, softmax, p v as ONNX Runtime runs them


def onnx_attention_shares(path: Path, scopes: list[str], feed: dict, threads: int, runs: int) -> dict[tuple, float]:
    """Share of an ONNX Runtime run spent in the attention nodes (``ATTENTION_NODES``) inside ``scopes`` (the exported
    PSA layers: q k^T, softmax and p v, the eq. 3 key sums, the fine attention; their convs are Conv nodes), per kind
    of node: ``(scope, op name, input shapes) -> median share`` over ``runs`` profiled runs after one left out. From
    ORT's profiler; shares, so that a slower profiled session does not inflate them. Kinds match across two graphs
    of one model: those of a k > 0 graph missing from the k=0 graph are what its fine attention adds."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = onnx_session_options(threads, Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    per_run: dict[tuple, list[float]] = {}
    for e in events:
        scope = next((s for s in scopes if e["name"].startswith(s)), None) if e.get("cat") == "Node" else None
        if scope is None or not e["name"].endswith("_kernel_time") or e["args"].get("op_name") not in ATTENTION_NODES:
            continue
        kind = (scope, e["args"]["op_name"], json.dumps(e["args"].get("input_type_shape")))
        shares = per_run.setdefault(kind, [0.0] * len(spans))
        for i, (start, end) in enumerate(spans):
            if start <= e["ts"] <= end:
                shares[i] += e["dur"] / (end - start)
    return {kind: statistics.median(shares) for kind, shares in per_run.items()}


def onnx_graph_path(folder: Path, label: str, batch: int) -> Path:
    """Where :func:`bench_models_onnx` writes the graph of variant ``label`` at ``batch``."""
    return Path(folder) / f"{label.replace(' ', '_')}-b{batch}.onnx"


def bench_models_onnx(args, variants: dict, folder: Path) -> list[dict]:
    """ONNX Runtime CPU latency of each default-backend variant (exported at top-k 0 / ``model_topk`` separately,
    into ``folder``), timed in a fresh process (ONNX Runtime's shared thread pool is made once per process).

    For PST models at top-k 0 the row also gives ``attention_ms``: the time of the PSA layers' attention nodes (their
    share of a run, :func:`onnx_attention_shares`, times the timed latency), what the k=0 graph must spend beyond a
    model without those layers.
    """
    rows = []
    for batch in args.model_batches:
        x = torch.rand(batch, 3, args.imgsz, args.imgsz)
        paths = {
            label: export_onnx(model.cpu(), k, x, onnx_graph_path(folder, label, batch))
            for label, (model, k, backend) in variants.items()
            if backend == "auto"  # the exported graph does not depend on the backend
        }
        profiled = {label: psa_scopes(model) for label, (model, k, _) in variants.items() if k == 0}
        [batch_rows] = in_fresh_processes(1, time_onnx_models, args, paths, profiled, x.numpy())
        rows += batch_rows
        print(f"onnxruntime batch {batch}: " + ", ".join(f"{row['model']}: {row['ms']:.1f} ms" for row in batch_rows))
    return rows


def time_onnx_models(args, paths: dict[str, Path], profiled: dict[str, list[str]], images) -> list[dict]:
    """Rows of :func:`bench_models_onnx` for one batch of ``images`` (a float32 array): each graph's median ms, and
    ``attention_ms`` for the labels in ``profiled`` (label -> its PSA scopes)."""
    feed = {"images": images}
    ms = medians(time_onnx_graphs(args, paths, feed))
    rows = []
    for label, t in ms.items():
        row = {"runtime": "onnxruntime", "model": label, "batch": images.shape[0], "ms": t}
        if label in profiled:
            shares = onnx_attention_shares(paths[label], profiled[label], feed, args.threads, args.repeats)
            row["attention_ms"] = sum(shares.values()) * t
        rows.append(row)
    return rows


# ----------------------------------------------------------------------- the model-latency targets, per process
def target_model_labels(topk: int) -> dict[str, tuple[str, str]]:
    """Model-latency target ratios -> (numerator, denominator) variant labels (of :func:`model_variants`)."""
    return {
        "k=0 / YOLO12n": ("yolo11n-pst k=0", "yolo12n"),
        f"k={topk} / k=0": (f"yolo11n-pst k={topk}", "yolo11n-pst k=0"),
    }


def bound_parts(imgsz: int, device) -> dict[str, Callable]:
    """The op calls that bound the model-latency ratios, at the PSA shapes of an N-scale model at ``imgsz``
    (:func:`op_shapes`, random inputs): per level the bare SDPA call and the eq. 2+3 pass, and at P3 the op at top-k 8
    (the op-latency target's numerator)."""
    from ..ops import attention, coarse_attention_with_scores, pyramid_sparse_attention

    calls = {}
    for shape in op_shapes(imgsz):
        level = shape["level"]
        (q, k, v, k_fine, v_fine), coarse_hw = psa_inputs(1, shape["heads"], shape["fine_hw"], device, torch.float32)
        calls[f"bare sdpa {level}"] = partial(attention, q, k, v, "sdpa")
        calls[f"{COARSE_PASS} {level}"] = partial(coarse_attention_with_scores, q, k, v, "sdpa")
        if level == "P3":
            op = partial(pyramid_sparse_attention, q, k, v, k_fine, v_fine, shape["fine_hw"], coarse_hw, topk=8)
            calls["op k=8 P3"] = partial(op, backend="sdpa")
    return calls


def bench_target_models(args, device: str, onnx_folder: str | None) -> tuple[int, dict[str, float]]:
    """The model-latency target ratios and their bounds in this process. Runs as a fresh process does
    (``args.threads`` threads, seed 0).

    PyTorch: YOLO12n and YOLO11n-PST at top-k 0 and ``model_topk`` (default backend, batch 1) round-robin, with the
    op calls of :func:`bound_parts` in the same rounds. The bound of k=0 / YOLO12n is 1 + bare SDPA at P3 and P4 /
    YOLO12n (SDPA's own time); that of k / k=0 is 1 + (eq. 2+3 pass - bare SDPA) at P3 and P4 / k=0 (what an exact
    eq. 3 costs with the pass). Also the op target, the op at k=8 / bare SDPA at P3, bounded by the eq. 2+3 pass
    it runs / bare SDPA.

    ONNX Runtime (graphs from ``onnx_folder``; None: none): the graphs round-robin, then profiled
    (:func:`onnx_attention_shares`). The bound of k=0 / YOLO12n is 1 + the k=0 graph's PSA attention nodes / YOLO12n;
    that of k / k=0 is 1 + the attention nodes the k graph adds (the eq. 3 key sums, the fine attention's products
    and softmax) / k=0.

    Every ratio and bound is taken within each round and the median over the rounds reported
    (:func:`median_over_rounds`). Returns this process's id and ``{"<runtime> <ratio>": value, "<runtime> <ratio>
    bound": bound, ...}``.
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(device)
    variants = model_variants(["yolo12n", "yolo11n-pst"], args.model_topk, ["auto"], device)
    x = torch.rand(1, 3, args.imgsz, args.imgsz, device=device)
    labels = target_model_labels(args.model_topk)
    k0_ratio, fine_ratio = labels  # "k=0 / YOLO12n", "k=<topk> / k=0"
    (k0, baseline), (fine, _) = labels[k0_ratio], labels[fine_ratio]
    rounds = time_models_eager(args, variants, x, device, also=bound_parts(args.imgsz, device))
    per_round = partial(median_over_rounds, rounds)  # every ratio and bound taken within each round, then the median
    levels = [shape["level"] for shape in op_shapes(args.imgsz)]

    def bare(ms):
        return sum(ms[f"bare sdpa {level}"] for level in levels)

    def passes(ms):
        return sum(ms[f"{COARSE_PASS} {level}"] for level in levels)

    values = {f"pytorch {name}": per_round(ratio_of(*pair)) for name, pair in labels.items()}
    values[f"pytorch {k0_ratio} bound"] = 1 + per_round(lambda ms: bare(ms) / ms[baseline])
    values[f"pytorch {fine_ratio} bound"] = 1 + per_round(lambda ms: (passes(ms) - bare(ms)) / ms[k0])
    values["pytorch op k=8 / bare SDPA"] = per_round(ratio_of("op k=8 P3", "bare sdpa P3"))
    values["pytorch op k=8 / bare SDPA bound"] = per_round(ratio_of(f"{COARSE_PASS} P3", "bare sdpa P3"))
    if onnx_folder is not None:
        paths = {label: onnx_graph_path(onnx_folder, label, 1) for label in variants}
        feed = {"images": x.cpu().numpy()}
        ort_rounds = time_onnx_graphs(args, paths, feed)
        ort_ratios = {name: median_over_rounds(ort_rounds, ratio_of(*pair)) for name, pair in labels.items()}
        values |= {f"onnxruntime {name}": value for name, value in ort_ratios.items()}
        scopes = psa_scopes(variants[k0][0])
        shares = {
            label: onnx_attention_shares(paths[label], scopes, feed, args.threads, args.repeats) for label in (k0, fine)
        }
        added = sum(share for kind, share in shares[fine].items() if kind not in shares[k0])
        values[f"onnxruntime {k0_ratio} bound"] = 1 + sum(shares[k0].values()) * ort_ratios[k0_ratio]
        values[f"onnxruntime {fine_ratio} bound"] = 1 + added * ort_ratios[fine_ratio]
    return os.getpid(), values


def bench_target_models_in_processes(args, device, onnx_folder: Path | None) -> list[dict]:
    """:func:`bench_target_models` in ``args.model_processes`` fresh processes, one after the other (ONNX Runtime's
    shared thread pool is made once per process): like the training ratio, a model-latency ratio moves more between
    processes than between rounds on a shared VM (k=8 / k=0 in PyTorch: 1.090 and 1.132 in two runs of one commit).
    Returns each process's id and ratios in run order; the targets take the median over processes."""
    if "yolo12n" not in args.models or "yolo11n-pst" not in args.models:
        return []
    folder = None if onnx_folder is None else str(onnx_folder)
    runs = in_fresh_processes(args.model_processes, bench_target_models, args, str(device), folder)
    return [{"pid": pid, "ratios": ratios} for pid, ratios in runs]


# -------------------------------------------------------------------------------------------- a training step
def random_detection_batch(batch: int, imgsz: int, device, boxes_per_image: int = 4) -> dict:
    """Random uint8 images and boxes in the layout Ultralytics' dataloader yields (normalised xywh boxes)."""
    g = torch.Generator().manual_seed(0)
    n = batch * boxes_per_image
    centers, sizes = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return {
        "img": torch.randint(0, 256, (batch, 3, imgsz, imgsz), generator=g, dtype=torch.uint8).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(boxes_per_image).float().to(device),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat((centers, sizes), dim=1).to(device),
    }


def training_iteration(name: str, batch: dict, device, accumulate: int) -> tuple[torch.nn.Module, Callable, Callable]:
    """An untrained ``name`` model and the two parts of an Ultralytics 8.4 detection training iteration of it.

    ``forward_backward`` runs every iteration, as ``BaseTrainer._do_train`` does: the batch as
    ``DetectionTrainer.preprocess_batch`` leaves it (uint8 images / 255), ``model(batch)`` (forward and
    ``v8DetectionLoss``) under autocast (AMP on CUDA only, as ``check_amp`` decides), ``loss.sum()`` backward through
    the gradient scaler. ``optimizer_step`` runs once per ``accumulate`` iterations, as ``BaseTrainer.optimizer_step``:
    unscale, gradient clipping at norm 10, SGD (the paper's recipe, nesterov, weight decay on conv/linear weights only:
    ``BaseTrainer.build_optimizer``'s groups), ``zero_grad`` and the EMA update.
    """
    from types import SimpleNamespace

    from ultralytics.cfg import get_cfg
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA

    import pst_yolo  # noqa: F401

    cfg = get_cfg()
    model = DetectionModel(f"{name}.yaml", verbose=False).to(device).train()
    model.args = cfg  # loss gains (box, cls, dfl), as the trainer attaches them
    decay = cfg.weight_decay * len(batch["img"]) * accumulate / cfg.nbs  # scaled as the trainer scales it
    trainer = SimpleNamespace(args=cfg)  # build_optimizer reads its trainer only for optimizer=auto
    optimizer = BaseTrainer.build_optimizer(trainer, model, "SGD", cfg.lr0, cfg.momentum, decay)
    ema, amp = ModelEMA(model), device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def forward_backward():
        images = {**batch, "img": batch["img"].float() / 255}
        with torch.autocast(device.type, enabled=amp):
            loss, _ = model(images)
        scaler.scale(loss.sum()).backward()

    def optimizer_step():
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        ema.update(model)

    return model, forward_backward, optimizer_step


def forward_recording(model: torch.nn.Module, images: torch.Tensor, hooks: list) -> None:
    """One forward of ``images`` without autograd for the ``hooks`` (handles of hooks that record what the modules
    see) to record, which are removed afterwards."""
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()


def psa_attention_shapes(model: torch.nn.Module, images: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(B, heads, N, M, head dim) of the coarse attention of each PSA layer in one forward of ``images``."""
    from ..nn import PSAttn

    shapes = []

    def record(module, inputs):
        x, up = inputs  # (B, C, H, W), (B, C, Hu, Wu)
        shapes.append((len(x), module.num_heads, x.shape[2] * x.shape[3], up.shape[2] * up.shape[3], module.head_dim))

    attention_modules = [m for m in model.modules() if isinstance(m, PSAttn)]
    forward_recording(model, images, [m.register_forward_pre_hook(record) for m in attention_modules])
    return shapes


def attention_forward_backward(shapes: list[tuple[int, int, int, int, int]], device) -> Callable[[], None]:
    """Forward and backward of the attention kernel a PSA layer trains with (the default backend, in AMP's float16 on
    CUDA as training runs it) at each of ``shapes`` (from :func:`psa_attention_shapes`), on seeded random tensors."""
    from ..ops import attention, resolve_backend

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    tensors = []
    for b, h, n, m, d in shapes:
        q, k, v, grad = (torch.randn(b, h, rows, d, generator=g).to(device, dtype) for rows in (n, m, m, n))
        tensors.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad))

    def run():
        for q, k, v, grad in tensors:
            out, _ = attention(q, k, v, resolve_backend(None, q, kv_len=k.shape[2]))
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    return run


def layers_forward_backward(
    model: torch.nn.Module, images: torch.Tensor, indices: list[int], part_type: type | None = None
) -> Callable[[], None]:
    """Forward and backward of the layers ``model.model[i]`` alone, i in ``indices`` (with ``part_type``: of every
    module of that type inside them instead), on the inputs one training forward of ``images`` gives them (in the
    memory format they train with), with seeded random output gradients; parameter gradients accumulate as in
    training."""
    modules = [model.model[i] for i in indices]
    if part_type is not None:
        modules = [m for layer in modules for m in layer.modules() if isinstance(m, part_type)]
    inputs = {}

    def record(module, args):
        inputs.setdefault(module, args[0])

    forward_recording(model, images, [m.register_forward_pre_hook(record) for m in modules])
    g = torch.Generator().manual_seed(0)
    calls = []
    for m in modules:
        x = [t.detach().clone().requires_grad_() for t in tree_leaves(inputs[m])]  # clone keeps the memory format
        arg = x if isinstance(inputs[m], (list, tuple)) else x[0]  # PST takes [fine, upper]
        out = m(arg)
        calls.append((m, arg, x, torch.randn(out.shape, generator=g).to(out)))

    def run():
        for m, arg, x, grad in calls:
            m(arg).backward(grad)
            for t in x:
                t.grad = None

    return run


def conv_training_flops(model: torch.nn.Module, images: torch.Tensor, indices: list[int]) -> int:
    """FLOPs of the forward and backward of every ``nn.Conv2d`` inside the layers ``model.model[i]``, i in
    ``indices``, in one training step on ``images``: per conv 2 MACs forward, 2 for the input gradient and 2 for the
    weight gradient, with MACs = output elements * input channels per group * kernel area."""
    convs = [m for i in indices for m in model.model[i].modules() if isinstance(m, torch.nn.Conv2d)]
    flops = []

    def record(module, inputs, output):
        kernel_area = module.kernel_size[0] * module.kernel_size[1]
        flops.append(6 * output.numel() * module.in_channels // module.groups * kernel_area)

    forward_recording(model, images, [m.register_forward_hook(record) for m in convs])
    return sum(flops)


def attention_training_flops(shapes: list[tuple[int, int, int, int, int]]) -> int:
    """FLOPs of the attention matmuls in one training step at ``shapes`` (B, heads, N, M, head dim), from
    :func:`psa_attention_shapes`: q k^T and p v forward (4 B h N M d), and the four products of their backward (dV,
    dP, dQ, dK: 8 B h N M d). A fused kernel that recomputes q k^T in its backward does more than this."""
    return sum(12 * b * h * n * m * d for b, h, n, m, d in shapes)


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (None where the OS does not report them)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def counting_page_faults(fn: Callable[[], object], counts: list[int]) -> Callable[[], None]:
    """``fn`` that appends the minor page faults of each call to ``counts``."""

    def run():
        before = minor_page_faults()
        fn()
        if before is not None:
            counts.append(minor_page_faults() - before)

    return run


def bench_train(args, device) -> tuple[list[dict], dict[str, float | None]]:
    """ms per training iteration: forward + loss + backward, plus 1/accumulate of an optimizer step (with the
    trainer's accumulate = round(nbs / batch), nbs = 64), each part timed round-robin across the models.

    Also timed in the same rounds, forward and backward of parts alone, at the shapes and inputs of the training
    forward: each model's layers at the PST model's PST rows (``replaced_layers_ms``: A2C2f blocks in YOLO12n, PST
    in the PST model), the Ultralytics ``Conv`` modules inside its PST layers (``convs_ms``) and the attention kernel at
    its PSA layers' shapes (``attention_ms``). How fast PST's kernels run: the ``nn.Conv2d`` kernels alone inside its
    PST layers (``conv_kernels_ms``) and the attention kernel, each as GFLOP/s (:func:`conv_training_flops`,
    :func:`attention_training_flops`), beside a dense GEMM's timed in the same rounds (``gemm_gflops``; 1024^2 on
    CPU). ``page_faults``: median minor page faults per forward+backward (the CPU
    allocator returning memory to the OS and faulting it back in; it moves from run to run).

    Returns the rows (per model, medians over the rounds) and the training ratio and its ceiling
    (:func:`training_ratio`, :func:`training_ceiling`), each taken within every round and the median over the rounds
    reported (:func:`median_over_rounds`); None without both models.
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.modules import Conv

    from ..nn import PST

    names = [n for n in ("yolo12n", "yolo11n-pst") if n in args.models] or ["yolo12n", "yolo11n-pst"]
    batch_size = args.train_batch
    accumulate = max(round(get_cfg().nbs / batch_size), 1)
    batch = random_detection_batch(batch_size, args.train_imgsz, device)
    images = batch["img"].float() / 255
    calls, models, faults = {}, {}, {n: [] for n in names}
    for name in names:
        models[name], forward_backward, calls[f"{name} optimizer"] = training_iteration(name, batch, device, accumulate)
        calls[f"{name} forward+backward"] = counting_page_faults(forward_backward, faults[name])
    pst_rows = next(([m.i for m in models[n].model if isinstance(m, PST)] for n in names if is_pst(models[n])), [])
    flops = {}  # call name -> FLOPs of one call, for the calls whose throughput is reported
    for name, model in models.items():
        if pst_rows:
            calls[f"{name} layers"] = layers_forward_backward(model, images, pst_rows)
        if is_pst(model):
            shapes = psa_attention_shapes(model, images)
            calls[f"{name} convs"] = layers_forward_backward(model, images, pst_rows, Conv)
            calls[f"{name} conv kernels"] = layers_forward_backward(model, images, pst_rows, torch.nn.Conv2d)
            calls[f"{name} attention"] = attention_forward_backward(shapes, device)
            flops[f"{name} conv kernels"] = conv_training_flops(model, images, pst_rows)
            flops[f"{name} attention"] = attention_training_flops(shapes)
    if flops:
        gemm_shape = (1024, torch.float32) if device.type == "cpu" else (4096, torch.float16)  # fp16: as AMP trains
        calls["gemm"], flops["gemm"] = gemm_call(device, *gemm_shape)
    rounds = time_rounds(calls, args.train_steps, 1, device, args.clock)
    ms = medians(rounds)
    gflops = {call: count / ms[call] / 1e6 for call, count in flops.items()}
    rows = []
    for n in names:
        fb, opt = ms[f"{n} forward+backward"], ms[f"{n} optimizer"]
        iteration = iteration_ms(ms, n, accumulate)
        rows.append(
            {"model": n, "batch": batch_size, "imgsz": args.train_imgsz, "accumulate": accumulate, "ms": iteration,
             "forward_backward_ms": fb, "optimizer_ms": opt, "images_per_s": 1e3 * batch_size / iteration,
             "page_faults": statistics.median(faults[n]) if faults[n] else None,
             "replaced_layers": ", ".join(map(str, pst_rows)), "replaced_layers_ms": ms.get(f"{n} layers"),
             "convs_ms": ms.get(f"{n} convs"), "conv_kernels_ms": ms.get(f"{n} conv kernels"),
             "attention_ms": ms.get(f"{n} attention"), "conv_gflops": gflops.get(f"{n} conv kernels"),
             "attention_gflops": gflops.get(f"{n} attention"),
             "gemm_gflops": gflops["gemm"] if f"{n} attention" in gflops else None}
        )  # fmt: skip
    print("train iteration: " + ", ".join(f"{r['model']}: {r['ms']:.0f} ms" for r in rows))
    both = {"yolo12n", "yolo11n-pst"} <= set(names)
    ratios = {
        name: median_over_rounds(rounds, partial(of_round, accumulate=accumulate)) if both else None
        for name, of_round in (("ratio", training_ratio), ("ceiling", training_ceiling))
    }
    return rows, ratios


def iteration_ms(ms: dict[str, float], model: str, accumulate: int) -> float:
    """One training iteration of ``model`` from :func:`bench_train`'s call times ``ms`` (one round's, or medians):
    forward+backward plus 1/accumulate of the optimizer step."""
    return ms[f"{model} forward+backward"] + ms[f"{model} optimizer"] / accumulate


def training_ratio(ms: dict[str, float], accumulate: int) -> float:
    """Training throughput YOLO11n-PST / YOLO12n from :func:`bench_train`'s call times ``ms``."""
    return iteration_ms(ms, "yolo12n", accumulate) / iteration_ms(ms, "yolo11n-pst", accumulate)


def training_ceiling(ms: dict[str, float], accumulate: int) -> float:
    """Training ratio YOLO11n-PST / YOLO12n from :func:`bench_train`'s call times ``ms`` if everything in PST's layers
    besides its Ultralytics Conv modules (the paper's convolutions with their BatchNorm and activation) and the
    attention kernel cost nothing, and the rest of the two networks (the same rows) cost the same: baseline /
    (baseline - replaced layers + convs + attention)."""
    baseline = iteration_ms(ms, "yolo12n", accumulate)
    parts = ms["yolo11n-pst convs"] + ms["yolo11n-pst attention"]
    return baseline / (baseline - ms["yolo12n layers"] + parts)


def bench_train_in_processes(args, device) -> tuple[list[dict], list[dict]]:
    """:func:`bench_train` in ``args.train_processes`` fresh processes, one after the other; with 1, in this one.

    The training ratio moves from process to process by more than from round to round (by up to 0.1 on a shared
    2-core VM; neither the allocator's page faults nor huge pages remove it, docs/BENCHMARKS.md), so one process does
    not rank it.
    Returns the rows of the process with the median ratio (the lower middle for an even count), and each process's
    id, ratio and ceiling in run order; the target takes the median of each over the processes.
    """
    if args.train_processes == 1:
        runs = [(os.getpid(), *bench_train(args, device))]  # (process id, rows, ratio and ceiling)
    else:
        runs = in_fresh_processes(args.train_processes, bench_train_fresh, args, str(device))
    spread = [{"pid": pid, **ratios} for pid, _, ratios in runs]
    order = sorted(range(len(runs)), key=lambda i: -1.0 if spread[i]["ratio"] is None else spread[i]["ratio"])
    pid, rows, _ = runs[order[(len(runs) - 1) // 2]]
    return [row | {"pid": pid} for row in rows], spread


def bench_train_fresh(args, device: str) -> tuple[int, list[dict], dict[str, float | None]]:
    """:func:`bench_train` as a fresh process runs it (``args.threads`` threads, seed 0), with that process's id first."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return os.getpid(), *bench_train(args, torch.device(device))


# ------------------------------------------------------------------------------------------------ the targets
def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
    return None if numerator is None or denominator is None else numerator[key] / denominator[key]


def target(
    name: str,
    value: float | None,
    sign: str | None = None,
    limit: float | None = None,
    bound: float | None = None,
    from_bound: float | None = None,
) -> dict:
    """One row of the targets table; ``met`` is None for a diagnostic ratio (no limit) or a missing value.

    ``bound``: the value of the bound that limits the ratio (a lower bound of a ``<=`` target, a ceiling of a ``>=``
    one), measured in the same processes; ``from_bound``: the median over those processes of ratio - bound, how far
    the code is from its bound (on the far side of it, the measurement's spread).
    """
    met = None if value is None or limit is None else (value <= limit if sign == "<=" else value >= limit)
    row = {"name": name, "value": value, "target": None if limit is None else f"{sign} {limit}", "met": met}
    return row | {"bound": bound, "from_bound": from_bound, "sign": sign, "limit": limit}


def verdict_text(row: dict) -> str:
    """``met`` / ``NOT met`` of a target row, with where it stands against its bound (see :func:`target`): a bound past
    the target makes a missed target unreachable; a ratio beyond its bound is the measurement's spread."""
    if row["met"] is None:
        return "-"
    parts = ["met" if row["met"] else "NOT met"]
    bound, distance, limit = row.get("bound"), row.get("from_bound"), row.get("limit")
    if None in (bound, distance):
        return parts[0]
    lower = row["sign"] == "<="
    if not row["met"] and (bound > limit if lower else bound < limit):
        parts.append(f"unreachable: its bound {bound:.3f} is past the target")
    if distance < 0 if lower else distance > 0:
        parts.append(f"{abs(distance):.3f} beyond its bound {bound:.3f}, so within the spread")
    elif not row["met"]:
        parts.append(f"the code {abs(distance):.3f} from its bound {bound:.3f}")
    return "; ".join(parts)


def model_flops(variants: dict, names: tuple[str, ...], imgsz: int) -> dict[str, float]:
    """GFLOPs of one (1, 3, imgsz, imgsz) forward at top-k 0 of the timed models ``names`` (labels of
    :func:`model_variants` without " k=0"), attention matmuls included."""
    from ..nn import set_topk
    from .model_sizes import all_flops

    flops = {}
    for label, (model, k, _) in variants.items():
        name = label.removesuffix(" k=0")
        if name in names and k in (None, 0):
            set_topk(model, 0)
            flops[name] = all_flops(model.cpu(), imgsz) / 1e9
    return flops


def targets(results: dict, model_topk: int) -> list[dict]:
    """The project's performance targets, their bounds and diagnostics as ratios of this run's numbers.

    The model-latency ratios, their bounds and the op-latency ratio are medians over the target processes
    (:func:`bench_target_models`), the training ratio and its ceiling medians over the training processes
    (:func:`bench_train`); each target row also gives the median over its processes of ratio - bound.
    """
    op, score = results["op"], results["score_step"]
    runs = [run["ratios"] for run in results.get("model_processes", [])]
    train_runs = [run for run in results["train_processes"] if None not in (run["ratio"], run["ceiling"])]
    train_ratio, train_ceiling = (median_or_none([run[key] for run in train_runs]) for key in ("ratio", "ceiling"))
    train_from_ceiling = median_or_none([run["ratio"] - run["ceiling"] for run in train_runs])
    sdpa_k0, sdpa_k8, naive_k8 = (
        find(op, imgsz=TARGET_SHAPE[0], level=TARGET_SHAPE[1], backend=b, topk=k)
        for b, k in (("sdpa", 0), ("sdpa", 8), ("naive", 8))
    )
    dense = find(score, variant=SCORE_DENSE)

    def model_row(name: str, runtime: str = "pytorch") -> dict | None:
        return find(results["models"], runtime=runtime, model=name, batch=1)

    def median(key: str) -> float | None:
        return median_or_none([run[key] for run in runs if key in run])

    def model_target(label: str, key: str, limit: float, bound_row: dict) -> dict:
        """Target row of the per-process ratio ``key`` ("<runtime> <ratio>"), with its bound ``key bound``."""
        from_bound = median_or_none([run[key] - run[f"{key} bound"] for run in runs if f"{key} bound" in run])
        return target(label, median(key), "<=", limit, bound_row["value"], from_bound)

    pst, k, mb = "yolo11n-pst", model_topk, "peak_mb"
    flops = results.get("flops", {})
    k0_ratio, fine_ratio = target_model_labels(k)  # "k=0 / YOLO12n", "k=<topk> / k=0"
    per_process = "median over the target processes"
    op_key, op_label = "pytorch op k=8 / bare SDPA", "PSA op 80x80/40x40 k=8 / bare SDPA"
    bound_rows = {
        "flops": target(
            "bound of the k=0 / YOLO12n ratio: FLOPs YOLO11n-PST / YOLO12n (attention included, equal efficiency)",
            flops[pst] / flops["yolo12n"] if {pst, "yolo12n"} <= set(flops) else None,
        ),
        ("pytorch", k0_ratio): target(
            f"bound of the k=0 / YOLO12n ratio (PyTorch): 1 + bare SDPA at P3 and P4 / YOLO12n ({per_process})",
            median(f"pytorch {k0_ratio} bound"),
        ),
        ("onnxruntime", k0_ratio): target(
            "bound of the k=0 / YOLO12n ratio (ONNX Runtime): 1 + PSA attention nodes (MatMul, Softmax) / YOLO12n "
            f"({per_process})",
            median(f"onnxruntime {k0_ratio} bound"),
        ),
        "training": target(
            "ceiling of the training ratio: YOLO12n / (YOLO12n - its layers at PST's rows + PST's Conv modules + "
            "attention kernel), forward+backward each alone (median over the training processes)",
            train_ceiling,
        ),
        ("pytorch", fine_ratio): target(
            f"bound of the fine-attention ratio (PyTorch): 1 + (eq. 2+3 pass - bare SDPA) at P3 and P4 / k=0 model "
            f"({per_process})",
            median(f"pytorch {fine_ratio} bound"),
        ),
        ("onnxruntime", fine_ratio): target(
            f"bound of the fine-attention ratio (ONNX Runtime): 1 + attention nodes k={k} adds (eq. 3 key sums, fine "
            f"attention) / k=0 model ({per_process})",
            median(f"onnxruntime {fine_ratio} bound"),
        ),
        "op": target(
            f"bound of the PSA op latency ratio: eq. 2+3 pass / bare SDPA at the model's P3 ({per_process})",
            median(f"{op_key} bound"),
        ),
    }  # fmt: skip
    if results["imgsz"] == TARGET_SHAPE[0] and median(op_key) is not None:
        op_latency = model_target(f"{op_label} latency ({per_process})", op_key, 2.0, bound_rows["op"])
    else:
        op_latency = target(f"{op_label} latency (op table)", sdpa_k8 and sdpa_k8["x_sdpa_ms"], "<=", 2.0)
    runtimes = (("PyTorch", "pytorch"), ("ONNX Runtime", "onnxruntime"))  # (in the label, in the process keys)
    rows = []
    for runtime, name in runtimes:
        label = f"YOLO11n-PST k=0 / YOLO12n latency ({runtime}, batch 1)"
        rows.append(model_target(label, f"{name} {k0_ratio}", 1.15, bound_rows[name, k0_ratio]))
    rows += [
        op_latency,
        target(f"{op_label} peak memory", sdpa_k8 and sdpa_k8["x_sdpa_mem"], "<=", 4.0),
        target(
            "train step throughput YOLO11n-PST / YOLO12n", train_ratio, ">=", 0.95, train_ceiling, train_from_ceiling,
        ),
    ]  # fmt: skip
    for runtime, name in runtimes:
        label = f"fine attention: YOLO11n-PST k={k} / k=0 latency ({runtime})"
        rows.append(model_target(label, f"{name} {fine_ratio}", 1.03, bound_rows[name, fine_ratio]))
    diagnostics = [
        target(
            f"fine attention, fused score pass (naive backend): YOLO11n-PST k={k} / k=0 (PyTorch)",
            ratio(model_row(f"{pst} k={k} naive"), model_row(f"{pst} k=0"), "ms"),
        ),
        target("PSA op 80x80/40x40 k=8: naive / sdpa latency", ratio(naive_k8, sdpa_k8, "ms")),
        target("score step peak memory: sdpa / dense N x M", ratio(find(score, variant=SCORE_SDPA), dense, mb)),
        target("score step peak memory: naive / dense N x M", ratio(find(score, variant=SCORE_FUSED), dense, mb)),
        target("PSA op 80x80/40x40 k=0 (sdpa) throughput / GEMM throughput", sdpa_k0 and sdpa_k0["gemm_fraction"]),
        target("PSA op 80x80/40x40 k=8 (sdpa) throughput / GEMM throughput", sdpa_k8 and sdpa_k8["gemm_fraction"]),
    ]
    return list(bound_rows.values()) + rows + diagnostics


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------------- reports
def machine_description(device: torch.device, threads: int, clock: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].strip() if names else cpu
    info = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "threads": threads, "clock": clock}
    info["torch"] = torch.__version__
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a Markdown table; columns are (key, header, format spec)."""

    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    m = results["machine"]
    target_rows = [{**t, "met": verdict_text(t), "target": t["target"] or "-"} for t in results["targets"]]
    parts = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads used), device {m['device']}, "
        f"torch {m['torch']}" + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; {m['clock']} clock.",
        f"Dense fp32 GEMM ({results['gemm']['size']}^2): {results['gemm']['gflops']:.1f} GFLOP/s.",
        "### Targets and ratios\n\n" + markdown_table(target_rows, [
            ("name", "ratio", "s"), ("value", "value", ".3f"), ("target", "target", "s"), ("bound", "bound", ".3f"),
            ("from_bound", "value - bound (median per process)", "+.3f"), ("met", "verdict", "s")]),
        "### PSA op (batch 1, head dim 32)\n\n" + markdown_table(results["op"], [
            ("imgsz", "input", "d"), ("level", "level", "s"), ("fine", "queries", "s"), ("coarse", "keys", "s"),
            ("heads", "heads", "d"), ("backend", "backend", "s"), ("topk", "top-k", "d"), ("ms", "ms", ".2f"),
            ("x_sdpa_ms", "x bare SDPA", ".2f"), ("peak_mb", "peak MB", ".2f"), ("x_sdpa_mem", "mem x SDPA", ".2f"),
            ("gflops", "GFLOP/s", ".1f"), ("gemm_fraction", "of GEMM", ".2f")]),
        "### Score step (eq. 2 + eq. 3) at 640 P3\n\n" + markdown_table(results["score_step"], [
            ("variant", "variant", "s"), ("batch", "batch", "d"), ("ms", "ms", ".1f"), ("peak_mb", "peak MB", ".1f"),
            ("x_dense_mem", "mem x dense", ".3f")]),
        "### Models (fused, eval, random weights)\n\n" + markdown_table(results["models"], [
            ("runtime", "runtime", "s"), ("model", "model", "s"), ("batch", "batch", "d"), ("ms", "ms", ".1f"),
            ("attention_ms", "of which PSA attention nodes ms", ".1f")]) + "\n\n" + model_spread_line(results),
        "### Training iteration (as Ultralytics' trainer: forward + loss + backward; clip + SGD + EMA every "
        "accumulate iterations)\n\n" + markdown_table(results["train"], [
            ("model", "model", "s"), ("batch", "batch", "d"), ("imgsz", "imgsz", "d"),
            ("forward_backward_ms", "forward+backward ms", ".0f"), ("optimizer_ms", "optimizer step ms", ".0f"),
            ("accumulate", "accumulate", "d"), ("ms", "ms/iteration", ".0f"), ("images_per_s", "images/s", ".2f"),
            ("page_faults", "page faults", ".0f"), ("replaced_layers", "layers", "s"),
            ("replaced_layers_ms", "those layers alone ms", ".1f"), ("convs_ms", "their Conv modules ms", ".1f"),
            ("conv_kernels_ms", "their conv kernels ms", ".1f"), ("attention_ms", "attention kernel ms", ".1f"),
            ("conv_gflops", "conv kernels GFLOP/s", ".1f"), ("attention_gflops", "attention GFLOP/s", ".1f"),
            ("gemm_gflops", "GEMM GFLOP/s, same rounds", ".1f")]) + "\n\n" + training_spread_line(results),
    ]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def model_spread_line(results: dict) -> str:
    """One sentence: each model-latency target ratio and bound in each process the target models ran in."""
    runs = results.get("model_processes", [])
    if not runs:
        return "Model-latency targets: not measured (--models lacks yolo12n or yolo11n-pst)."
    lists = [f"{name}: " + ", ".join(f"{run['ratios'][name]:.3f}" for run in runs) for name in runs[0]["ratios"]]
    return (
        f"Model-latency target ratios and their bounds (each the median over its rounds of the value within a round) "
        f"in each of the {len(runs)} processes the target models ran in, in run order: "
        + "; ".join(lists)
        + "; the targets take the median of each."
    )


def training_spread_line(results: dict) -> str:
    """One sentence: the training ratio (and its ceiling) of each process the training section ran in."""

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    runs = ", ".join(f"{number(r['ratio'])} (ceiling {number(r['ceiling'])})" for r in results["train_processes"])
    return (
        "Training ratio YOLO11n-PST / YOLO12n and its ceiling (each the median over its rounds of the value within a "
        f"round) in each process the training section ran in, in run order: {runs}; the target takes the median of "
        "each; the training table shows the process whose ratio is the median."
    )


def plot(results: dict, path: Path) -> Path:
    """Op latency against top-k (per input size at P3, per backend) and model latencies, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for imgsz in sorted({r["imgsz"] for r in results["op"]}):
        for backend in sorted({r["backend"] for r in results["op"]} - {"bare sdpa", COARSE_PASS}):
            rows = [r for r in results["op"] if r["imgsz"] == imgsz and r["level"] == "P3" and r["backend"] == backend]
            if rows:
                left.plot([r["topk"] for r in rows], [r["ms"] for r in rows], marker="o", label=f"{backend} {imgsz}")
    left.set(xlabel="top-k", ylabel="ms", yscale="log", title="PSA op at P3 (1 head)")
    left.legend(fontsize=7)
    short = {"pytorch": "torch", "onnxruntime": "onnx"}
    labels = [f"{r['model']} ({short.get(r['runtime'], r['runtime'])}, b{r['batch']})" for r in results["models"]]
    right.barh(labels, [r["ms"] for r in results["models"]])
    right.set(xlabel="ms", title=f"Models at {results['imgsz']}")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    """Run every benchmark, print the target ratios and write bench.md / bench.json / bench.png."""
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    gemm_size = 256 if args.quick else (8192 if device.type == "cuda" else 2048)
    results = {"machine": machine_description(device, args.threads, args.clock), "imgsz": args.imgsz}
    results["args"] = vars(args) | {"out": str(args.out)}
    gflops = gemm_gflops(device, gemm_size, max(3, args.repeats // 2), args.clock)
    results["gemm"] = {"size": gemm_size, "gflops": gflops}
    print(f"GEMM: {results['gemm']['gflops']:.1f} GFLOP/s")
    results["op"] = bench_op(args, device, dtype, results["gemm"]["gflops"])
    results["score_step"] = bench_score_step(args, device, dtype)
    variants = model_variants(args.models, args.model_topk, args.model_backends, device)
    results["models"] = bench_models_eager(args, variants, device)
    with tempfile.TemporaryDirectory() as onnx_folder:
        onnx_folder = None if args.no_onnx or importlib.util.find_spec("onnxruntime") is None else Path(onnx_folder)
        if onnx_folder is not None:
            results["models"] += bench_models_onnx(args, variants, onnx_folder)
        if 1 not in args.model_batches:
            onnx_folder = None  # the target graphs are batch 1
        results["model_processes"] = bench_target_models_in_processes(args, device, onnx_folder)
    print(model_spread_line(results))
    results["train"], results["train_processes"] = bench_train_in_processes(args, device)
    results["flops"] = model_flops(variants, ("yolo12n", "yolo11n-pst"), args.imgsz)
    results["targets"] = targets(results, args.model_topk)
    print(training_spread_line(results))
    for t in results["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = "" if t["met"] is None else f" (target {t['target']}: {verdict_text(t)})"
        print(f"{t['name']}: {value}{verdict}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "bench.md").write_text(markdown_report(results))
    plot(results, args.out / "bench.png")
    print(f"Results in {args.out}/bench.md, bench.json, bench.png")
    return results


if __name__ == "__main__":
    main()
