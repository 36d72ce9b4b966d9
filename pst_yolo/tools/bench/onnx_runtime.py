"""The ONNX Runtime rows of ``pst-yolo bench``'s model section: each model exported to ONNX (TorchScript exporter,
opset 18) and timed in ONNX Runtime's CPU provider in a fresh process, its sessions sharing one thread pool; for PST
models at top-k 0, the time of their PSA attention nodes from ONNX Runtime's profiler."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import torch

from .timing import time_round_robin

ATTENTION_NODES = ("MatMul", "FusedMatMul", "Softmax")  # q k^T, softmax, p v as ONNX Runtime runs them


def export_onnx(model: torch.nn.Module, topk: int | None, x: torch.Tensor, path: Path) -> Path:
    """TorchScript ONNX export (opset 18, static shapes), the exporter Ultralytics 8.4 uses."""
    from ...nn import set_topk

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
    shared pool. ONNX Runtime creates the pool once per process, so a process times with one thread count: time
    another in a fresh process (:func:`in_fresh_process`).

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
    from ...nn import PSAttn

    return [onnx_scope(name) for name, module in model.named_modules() if isinstance(module, PSAttn)]


def onnx_attention_shares(path: Path, scopes: list[str], feed: dict, threads: int, runs: int) -> dict[tuple, float]:
    """Share of an ONNX Runtime run spent in the attention nodes (``ATTENTION_NODES``) inside ``scopes`` (the exported
    PSA layers: q k^T, softmax and p v, the eq. 3 key sums, the fine attention; their convs are Conv nodes), per kind
    of node: ``(scope, op name, input shapes) -> median share`` over ``runs`` profiled runs after one left out. From
    ORT's profiler; shares, so that a slower profiled session does not inflate them."""
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


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a fresh (spawned) process, and its result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_models_onnx(args, variants: dict, folder: Path) -> list[dict]:
    """ONNX Runtime CPU latency of each default-backend variant (exported at top-k 0 / ``model_topk`` separately,
    into ``folder``) on random (batch, 3, imgsz, imgsz) images per batch of ``args.model_batches``, timed in a fresh
    process (ONNX Runtime's shared thread pool is made once per process).

    For PST models at top-k 0 the row also gives ``attention_ms``: the time of the PSA layers' attention nodes (their
    share of a run, :func:`onnx_attention_shares`, times the timed latency), what the k=0 graph must spend beyond a
    model without those layers.
    """
    rows = []
    for batch in args.model_batches:
        x = torch.rand(batch, 3, args.imgsz, args.imgsz, generator=torch.Generator().manual_seed(0))
        paths = {
            label: export_onnx(model.cpu(), k, x, Path(folder) / f"{label.replace(' ', '_')}-b{batch}.onnx")
            for label, (model, k, backend) in variants.items()
            if backend == "auto"  # the exported graph does not depend on the backend
        }
        profiled = {label: psa_scopes(model) for label, (model, k, _) in variants.items() if k == 0}
        batch_rows = in_fresh_process(time_onnx_models, args, paths, profiled, x.numpy())
        rows += batch_rows
        print(f"onnxruntime batch {batch}: " + ", ".join(f"{row['model']}: {row['ms']:.1f} ms" for row in batch_rows))
    return rows


def time_onnx_models(args, paths: dict[str, Path], profiled: dict[str, list[str]], images) -> list[dict]:
    """Rows of :func:`bench_models_onnx` for one batch of ``images`` (a float32 array, (B, 3, H, W)): the median ms of
    each graph of ``paths`` (label -> ONNX file), timed round-robin in ONNX Runtime's CPU provider, the sessions
    sharing this process's one pool of ``args.threads`` threads (:func:`share_onnx_thread_pool`); and
    ``attention_ms`` for the labels in ``profiled`` (label -> its PSA scopes)."""
    import onnxruntime as ort

    feed = {"images": images}
    options = onnx_session_options(args.threads)
    sessions = {
        label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for label, path in paths.items()
    }
    calls = {label: partial(session.run, None, feed) for label, session in sessions.items()}
    ms = time_round_robin(calls, args.repeats, args.warmup, torch.device("cpu"), args.clock)
    rows = []
    for label, t in ms.items():
        row = {"runtime": "onnxruntime", "model": label, "batch": images.shape[0], "ms": t}
        if label in profiled:
            shares = onnx_attention_shares(paths[label], profiled[label], feed, args.threads, args.repeats)
            row["attention_ms"] = sum(shares.values()) * t
        rows.append(row)
    return rows
