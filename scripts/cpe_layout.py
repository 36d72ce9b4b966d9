"""Training cost of the CPE conv (7x7 depthwise Conv + BN) on the CPU, channels-first against channels-last.

PSAttn runs its CPE conv channels-last where the backward runs on the CPU (``PSAttn.positional_encoding``). This
times forward + backward of a PSAttn's CPE conv (Ultralytics ``Conv(C, C, 7, g=C, act=False)``) at the coarse V maps
YOLO11n-PST's PSA layers train with (batch 8 at 320: P3 32x20x20, P4 64x10x10; batch 16 at 640: 32x40x40, 64x20x20):
called directly (channels-first) and through ``positional_encoding`` (channels-last: a copy in, the conv, a copy back
out), in interleaved rounds: medians of process CPU time with 1 thread, of wall time with more.

    python scripts/cpe_layout.py                # 1 thread
    python scripts/cpe_layout.py --threads 2
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch

from pst_yolo.nn.psa import HEAD_DIM, PSAttn
from pst_yolo.tools.benchmark import time_round_robin

SHAPES = ((8, 32, 20, 20), (8, 64, 10, 10), (16, 32, 40, 40), (16, 64, 20, 20))  # (B, C, Hu, Wu)


def forward_backward(cpe: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, grad: torch.Tensor) -> None:
    cpe(v).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = "cpu" if args.threads == 1 else "wall"
    g = torch.Generator().manual_seed(0)
    print(
        f"| B, C, H, W | channels-first ms | channels-last ms | speed-up |  ({args.threads} thread(s), {clock} clock)"
    )
    print("|---|---|---|---|")
    for shape in SHAPES:
        attn = PSAttn(shape[1], shape[1] // HEAD_DIM).train()
        v = torch.randn(shape, generator=g).requires_grad_()
        grad = torch.randn(shape, generator=g)
        # positional_encoding goes channels-last: v requires grad and lives on the CPU
        calls = {"first": partial(forward_backward, attn.pe, v, grad),
                 "last": partial(forward_backward, attn.positional_encoding, v, grad)}  # fmt: skip
        ms = time_round_robin(calls, args.rounds, 3, torch.device("cpu"), clock)
        print(
            f"| {', '.join(map(str, shape))} | {ms['first']:.2f} | {ms['last']:.2f} | {ms['first'] / ms['last']:.2f} |"
        )


if __name__ == "__main__":
    main()
