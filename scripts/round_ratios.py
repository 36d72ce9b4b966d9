"""Two estimators of a model-latency ratio on a shared machine: the ratio of two medians, or the median of ratios
taken within each round.

Times YOLO12n and YOLO11n-PST at top-k 0 and 8 (random init, fused, eval, batch 1) round-robin in PyTorch, as
``pst-yolo bench``'s target processes do, in ``--blocks`` consecutive blocks of ``--rounds`` rounds per fresh
process, and prints for each block k=0 / YOLO12n and k=8 / k=0 both ways:

- ``of medians``: median time of the numerator / median time of the denominator (the benchmark until run V);
- ``per round``: the median over the rounds of numerator / denominator within one round (the benchmark since run W).

Within one round the two models run moments apart, so a slower stretch of the machine that spans the round slows
both; the spread of each estimator over the blocks is what one process's ratio can be trusted to. Usage (the figures
of docs/BENCHMARKS.md):

    python scripts/round_ratios.py --threads 1 --processes 2 --blocks 4
"""

from __future__ import annotations

import argparse
import os
import statistics

LABELS = ("yolo12n", "yolo11n-pst k=0", "yolo11n-pst k=8")
RATIOS = {"k=0 / YOLO12n": (LABELS[1], LABELS[0]), "k=8 / k=0": (LABELS[2], LABELS[1])}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: process CPU time, more: wall clock)")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes, one after the other")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of rounds per process")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per block (the benchmark's --repeats)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before each block")
    parser.add_argument("--imgsz", type=int, default=640)
    return parser.parse_args(argv)


def time_blocks(args: argparse.Namespace) -> list[dict[str, float]]:
    """Both estimators of each ratio in each block; runs in a fresh process."""
    import torch

    from pst_yolo.tools.benchmark import (
        forward_with_topk,
        median_over_rounds,
        medians,
        model_variants,
        ratio_of,
        time_rounds,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    variants = model_variants(["yolo12n", "yolo11n-pst"], 8, ["auto"], cpu)
    x = torch.rand(1, 3, args.imgsz, args.imgsz)
    calls = {label: forward_with_topk(*variants[label][:3], x) for label in LABELS}
    clock = "cpu" if args.threads == 1 else "wall"
    blocks = []
    with torch.inference_mode():
        for _ in range(args.blocks):
            rounds = time_rounds(calls, args.rounds, args.warmup, cpu, clock)
            ms = medians(rounds)
            block = {}
            for name, (num, den) in RATIOS.items():
                block[f"{name} of medians"] = ms[num] / ms[den]
                block[f"{name} per round"] = median_over_rounds(rounds, ratio_of(num, den))
            blocks.append(block)
    return blocks


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    from pst_yolo.tools.benchmark import in_fresh_processes

    blocks = [block for run in in_fresh_processes(args.processes, time_blocks, args) for block in run]
    clock = "process CPU time" if args.threads == 1 else "wall clock"
    print(f"\n{args.threads} thread(s), {clock}, batch 1 at {args.imgsz}; {len(blocks)} blocks of {args.rounds} rounds")
    print("| estimator | " + " | ".join(f"block {i + 1}" for i in range(len(blocks))) + " | spread (max - min) |")
    print("|---|" + "---|" * (len(blocks) + 1))
    for key in blocks[0]:
        values = [block[key] for block in blocks]
        spread = max(values) - min(values)
        print(
            f"| {key} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {spread:.3f} (sd {statistics.pstdev(values):.3f}) |"
        )
    return blocks


if __name__ == "__main__":
    main()
