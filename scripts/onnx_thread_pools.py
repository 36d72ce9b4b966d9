"""How ONNX Runtime's thread pools change the model-latency timing of ``pst-yolo bench``.

Times YOLO12n and YOLO11n-PST at top-k 0 and 8 (random init, exported as the benchmark exports them) in ONNX
Runtime's CPU provider, three ways, each in fresh processes (alternating):

- ``own pools``: the three sessions round-robin, each with its own pool of ``--threads`` threads (the benchmark
  until this script);
- ``shared pool``: the three sessions round-robin, sharing the process's one pool (the benchmark now);
- ``alone``: one session at a time with its own pool, timed in a block of its own (no round-robin).

With more than one thread, a session's worker threads spin for more work after its run, while the next session of
a round runs. Usage (the figures of docs/BENCHMARKS.md):

    python scripts/onnx_thread_pools.py --threads 2 --processes 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path

SETUPS = ("own pools", "shared pool", "alone")
LABELS = ("yolo12n", "yolo11n-pst k=0", "yolo11n-pst k=8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per setup")
    parser.add_argument("--rounds", type=int, default=20, help="timed runs per graph")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per graph first")
    parser.add_argument("--imgsz", type=int, default=640)
    return parser.parse_args(argv)


def time_setup(setup: str, paths: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Median wall-clock ms of each graph under ``setup``; runs in a fresh process."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from pst_yolo.tools.benchmark import onnx_session_options, time_round_robin

    if setup == "shared pool":
        options = onnx_session_options(args.threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
    feed = {"images": np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)}
    cpu = torch.device("cpu")

    def session(label: str):
        return ort.InferenceSession(paths[label], options, providers=["CPUExecutionProvider"])

    if setup == "alone":
        ms = {}
        for label in LABELS:  # the session and its pool are freed before the next one is made
            ms |= time_round_robin({label: partial(session(label).run, None, feed)}, args.rounds, args.warmup, cpu)
        return ms
    calls = {label: partial(session(label).run, None, feed) for label in LABELS}
    return time_round_robin(calls, args.rounds, args.warmup, cpu)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    import torch

    from pst_yolo.tools.benchmark import export_onnx, in_fresh_processes, model_variants

    variants = model_variants(["yolo12n", "yolo11n-pst"], 8, ["auto"], torch.device("cpu"))
    runs: dict[str, list[dict[str, float]]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory() as folder:
        x = torch.rand(1, 3, args.imgsz, args.imgsz)
        paths = {
            label: str(export_onnx(model, k, x, Path(folder) / f"{label.replace(' ', '_')}.onnx"))
            for label, (model, k, _) in variants.items()
        }
        for _ in range(args.processes):
            for setup in SETUPS:
                [ms] = in_fresh_processes(1, time_setup, setup, paths, args)
                runs[setup].append(ms)
                print(f"{setup:12s} " + ", ".join(f"{label}: {ms[label]:.1f} ms" for label in LABELS), flush=True)
    print(
        f"\nONNX Runtime CPU, {args.threads} threads, batch 1 at {args.imgsz}, medians over {args.processes} processes"
    )
    print("| setup | YOLO12n ms | k=0 ms | k=8 ms | k=0 / YOLO12n (per process) | k=8 / k=0 (per process) |")
    print("|---|---|---|---|---|---|")
    for setup, ms in runs.items():
        median = {label: statistics.median(run[label] for run in ms) for label in LABELS}
        k0 = ", ".join(f"{run[LABELS[1]] / run[LABELS[0]]:.3f}" for run in ms)
        k8 = ", ".join(f"{run[LABELS[2]] / run[LABELS[1]]:.3f}" for run in ms)
        print(f"| {setup} | " + " | ".join(f"{median[label]:.1f}" for label in LABELS) + f" | {k0} | {k8} |")
    return runs


if __name__ == "__main__":
    main()
