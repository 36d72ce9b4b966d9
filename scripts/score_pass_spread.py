"""Process-to-process spread of the eq. 2+3 pass (docs/BENCHMARKS.md, "The pass is no longer bimodal").

Each run is a fresh process that times, at 640 px and batch 1 with one thread (process CPU time; ``--threads N``:
N threads, wall clock; medians of interleaved rounds), the bare SDPA call, the blocked eq. 2+3 pass and the whole op
at top-k 8, at P3 (80x80 over 40x40, 1 head) and P4 (40x40 over 20x20, 2 heads). ``--large-mmap-threshold`` runs
the same processes with glibc's mmap threshold raised, so that fresh 1 MB blocks are no zero-filled mmaps.
``--block-exponents`` adds the pass with blocks of 2^e elements (the default block is 2^18 on CPU).

    python scripts/score_pass_spread.py --runs 3
    python scripts/score_pass_spread.py --runs 3 --large-mmap-threshold
    python scripts/score_pass_spread.py --runs 1 --block-exponents 15 16 17 18 19
    python scripts/score_pass_spread.py --runs 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
LEVELS = (("P3", 80, 1), ("P4", 40, 2))  # name, fine side, heads (head dim 32)


def measure(rounds: int, block_exponents: list[int], threads: int) -> dict[str, float]:
    """Median ms per variant and level in this process: process CPU time with 1 thread, wall clock with more."""
    import torch
    import torch.nn.functional as F

    from pst_yolo.ops import coarse_attention_with_scores, pyramid_sparse_attention
    from pst_yolo.tools.benchmark import time_round_robin

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    medians = {}
    for level, side, heads in LEVELS:
        up = side // 2
        q, kf, vf = (torch.randn(1, heads, side * side, 32) for _ in range(3))
        k, v = (torch.randn(1, heads, up * up, 32) for _ in range(2))
        calls = {
            f"{level} bare SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
            f"{level} eq. 2+3 pass": lambda: coarse_attention_with_scores(q, k, v, "sdpa"),
            f"{level} op k=8": lambda: pyramid_sparse_attention(
                q, k, v, kf, vf, (side, side), (up, up), 8, 1e-6, "sdpa"
            ),
        }
        for e in block_exponents:
            calls[f"{level} pass 2^{e} blocks"] = lambda e=e: coarse_attention_with_scores(q, k, v, "sdpa", 1 << e)
        with torch.inference_mode():
            medians |= time_round_robin(calls, rounds - 3, 3, torch.device("cpu"), "cpu" if threads == 1 else "wall")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds per process (3 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than 1: wall clock)")
    parser.add_argument("--large-mmap-threshold", action="store_true", help="raise glibc's mmap threshold")
    parser.add_argument("--block-exponents", type=int, nargs="*", default=[], help="also time 2^e-element blocks")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 4:
        parser.error("--runs must be >= 1 and --rounds >= 4")
    if args.child:
        print(json.dumps(measure(args.rounds, args.block_exponents, args.threads)))
        return
    env = os.environ | (MALLOC_ENV if args.large_mmap_threshold else {})
    exponents = [str(e) for e in args.block_exponents]
    command = [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--threads", str(args.threads)]
    command += ["--block-exponents", *exponents]
    runs = [json.loads(subprocess.check_output(command, env=env, text=True).splitlines()[-1]) for _ in range(args.runs)]
    print(f"ms per call, {args.runs} processes" + (" (large mmap threshold)" if args.large_mmap_threshold else ""))
    for name in runs[0]:
        print(f"{name:>22}: " + "  ".join(f"{run[name]:7.2f}" for run in runs))


if __name__ == "__main__":
    main()
