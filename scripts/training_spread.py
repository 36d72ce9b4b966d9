"""The training ratio YOLO11n-PST / YOLO12n, both estimators, and its ceiling in fresh processes.

Runs ``pst-yolo bench``'s training section (:func:`pst_yolo.tools.benchmark.bench_train`: batch 8 at 320, forward +
loss + backward + optimizer step / accumulate, 8 rounds) in ``--processes`` fresh processes one after the other and
prints, per process:

- ``of medians``: YOLO12n's median iteration / YOLO11n-PST's (the benchmark until run X);
- ``per round``: the median over the rounds of that ratio within one round (the benchmark since run Y);
- ``ceiling``: the training ceiling, per round as the benchmark takes it;
- ``per round - ceiling``: how far the code is from that ceiling, in the same process.

and the median, the standard deviation and the mean with its 95% confidence interval (Student's t) of each over the
processes: whether the mean sits above or below the target 0.95 at that confidence. Usage (the figures of
docs/BENCHMARKS.md):

    python scripts/training_spread.py --threads 1 --processes 6
"""

from __future__ import annotations

import argparse
import os
import statistics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: process CPU time, more: wall clock)")
    parser.add_argument("--processes", type=int, default=6, help="fresh processes, one after the other")
    parser.add_argument("--quick", action="store_true", help="the benchmark's --quick settings (a smoke run)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "true")
    from pst_yolo.tools import benchmark

    clock = "cpu" if args.threads == 1 else "wall"
    bench_args = ["--threads", str(args.threads), "--clock", clock, "--models", "yolo12n", "yolo11n-pst"]
    bench_args = benchmark.parse_args(bench_args + (["--quick"] if args.quick else []))
    runs = benchmark.in_fresh_processes(args.processes, benchmark.bench_train_fresh, bench_args, "cpu")
    processes = []
    for _, rows, within in runs:
        ms = {row["model"]: row["ms"] for row in rows}
        of_medians = ms["yolo12n"] / ms["yolo11n-pst"]
        processes.append(
            {"of medians": of_medians, "per round": within["ratio"], "ceiling": within["ceiling"],
             "per round - ceiling": within["ratio"] - within["ceiling"]}
        )  # fmt: skip
    print(f"\n{args.threads} thread(s), {'process CPU time' if clock == 'cpu' else 'wall clock'}")
    columns = " | ".join(f"process {i + 1}" for i in range(len(processes)))
    print(f"| estimator | {columns} | median | sd | mean [95% CI] |")
    print("|---|" + "---|" * (len(processes) + 3))
    for key in processes[0]:
        values = [process[key] for process in processes]
        sd, mean, low, high = spread(values)
        cells = " | ".join(f"{v:.3f}" for v in values)
        print(f"| {key} | {cells} | {statistics.median(values):.3f} | {sd:.3f} | {mean:.3f} [{low:.3f}, {high:.3f}] |")
    return processes


def spread(values: list[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Standard deviation of ``values``, their mean and the two ends of its Student's t confidence interval (for one
    value: sd 0 and the mean three times)."""
    from scipy import stats  # an Ultralytics dependency

    mean = statistics.fmean(values)
    if len(values) < 2:
        return 0.0, mean, mean, mean
    sd = statistics.stdev(values)
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * sd / len(values) ** 0.5
    return sd, mean, mean - half, mean + half


if __name__ == "__main__":
    main()
