"""Cost of the CPE (7x7 depthwise Conv + BN, then a bilinear resize to the fine size) on the CPU, channels-first
against channels-last.

PSAttn runs its CPE channels-last on the CPU (``PSAttn.positional_encoding``: a copy of the coarse V map in, the
conv and the resize, a copy of the result out whose backward hands the gradient back channels-last). This times it
against the same conv and resize channels-first, as the authors' code runs them, at the maps of YOLO11n-PST's PSA
layers (P3 C'=32, P4 C'=64):

- training, forward + backward, in train mode: batch 8 at 320 (the benchmark's training step), batch 16 at 640;
- inference, forward only under no_grad, in eval mode: batch 1 at 640.

Interleaved rounds: medians of process CPU time with 1 thread, of wall time with more.

    python scripts/cpe_layout.py                # 1 thread
    python scripts/cpe_layout.py --threads 2
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from pst_yolo.nn.psa import HEAD_DIM, PSAttn
from pst_yolo.tools.benchmark import time_round_robin

SHAPES = (  # (pass, (B, C, Hu, Wu)); the fine map is 2Hu x 2Wu
    ("train", (8, 32, 20, 20)),
    ("train", (8, 64, 10, 10)),
    ("train", (16, 32, 40, 40)),
    ("train", (16, 64, 20, 20)),
    ("infer", (1, 32, 40, 40)),
    ("infer", (1, 64, 20, 20)),
)


def channels_first_cpe(attn: PSAttn, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The CPE conv and resize in v's channels-first layout."""
    return F.interpolate(attn.pe(v), size=size, mode="bilinear", align_corners=False)


def run(cpe, attn: PSAttn, v: torch.Tensor, grad: torch.Tensor | None) -> None:
    size = grad.shape[2:] if grad is not None else (2 * v.shape[2], 2 * v.shape[3])
    if grad is None:
        with torch.no_grad():
            cpe(attn, v, size)
    else:
        cpe(attn, v, size).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = "cpu" if args.threads == 1 else "wall"
    g = torch.Generator().manual_seed(0)
    print(f"({args.threads} thread(s), {clock} clock)\n")
    print("| pass | B, C, Hu, Wu | channels-first ms | channels-last ms | speed-up |")
    print("|---|---|---|---|---|")
    for mode, shape in SHAPES:
        B, C, Hu, Wu = shape
        attn = PSAttn(C, C // HEAD_DIM).train(mode == "train")
        v = torch.randn(shape, generator=g).requires_grad_(mode == "train")
        grad = torch.randn(B, C, 2 * Hu, 2 * Wu, generator=g) if mode == "train" else None
        calls = {"first": partial(run, channels_first_cpe, attn, v, grad),
                 "last": partial(run, PSAttn.positional_encoding, attn, v, grad)}  # fmt: skip
        ms = time_round_robin(calls, args.rounds, 3, torch.device("cpu"), clock)
        label = "forward + backward" if mode == "train" else "forward"
        print(
            f"| {label} | {B}, {C}, {Hu}, {Wu} | {ms['first']:.2f} | {ms['last']:.2f} | {ms['first'] / ms['last']:.2f} |"
        )


if __name__ == "__main__":
    main()
