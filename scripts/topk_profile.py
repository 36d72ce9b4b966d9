"""Where a PST model's extra time at top-k K goes in PyTorch: self CPU time per aten op at k=0 and at k=K.

Builds the model as ``pst-yolo bench`` does (random init, fused, eval, batch 1, the default backend) and profiles one
forward at k=0 and one at k=K in every round (``torch.profiler``, CPU), alternating, so that a slower stretch of a
shared machine hits both. Prints a table of the ops whose median self time per forward differs most between the two,
and the totals. Usage (the figures of docs/BENCHMARKS.md):

    python scripts/topk_profile.py --threads 1 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo11n-pst", help="a PST model YAML name without .yaml")
    parser.add_argument("--topk", type=int, default=8, help="the top-k compared with k=0")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=10, help="profiled rounds (one forward at each top-k)")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled rounds first")
    parser.add_argument("--ops", type=int, default=15, help="rows: the ops that differ most")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Returns op name -> {"k=0": ms, "k=K": ms}, medians per forward over the rounds."""
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pst_yolo.tools.benchmark import forward_with_topk, model_variants

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    variants = model_variants([args.model], args.topk, ["auto"], cpu)
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    labels = ("k=0", f"k={args.topk}")
    calls = {label: forward_with_topk(*variants[f"{args.model} {label}"][:3], x) for label in labels}
    times: dict[str, dict[str, list[float]]] = {label: defaultdict(list) for label in labels}
    with torch.inference_mode():
        for round_index in range(args.warmup + args.rounds):
            for label, forward in calls.items():
                if round_index < args.warmup:
                    forward()
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    forward()
                for event in prof.key_averages():
                    times[label][event.key].append(event.self_cpu_time_total / 1e3)
    ops = set(times[labels[0]]) | set(times[labels[1]])
    table = {
        op: {
            label: statistics.median(times[label][op] + [0.0] * (args.rounds - len(times[label][op])))
            for label in labels
        }
        for op in ops
    }  # an op absent from a round took 0 ms in it
    rows = sorted(table.items(), key=lambda item: -abs(item[1][labels[1]] - item[1][labels[0]]))[: args.ops]
    print(f"\n{args.model} at {args.imgsz}, batch 1, {args.threads} thread(s): self CPU time per forward, medians of "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"| op | {labels[0]} ms | {labels[1]} ms | difference ms |")
    print("|---|---|---|---|")
    for op, ms in rows:
        print(f"| {op} | {ms[labels[0]]:.3f} | {ms[labels[1]]:.3f} | {ms[labels[1]] - ms[labels[0]]:+.3f} |")
    totals = [sum(ms[label] for ms in table.values()) for label in labels]
    print(f"| all ops | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] - totals[0]:+.3f} |")
    return table


if __name__ == "__main__":
    main()
