"""Latency of each top-k for ``pst-yolo topk``: the fused model in eval mode on one fixed image at the deployment
size, batch 1, timed in interleaved rounds (every k once per round), reported as the median and interquartile range
over the rounds. A k is ranked against the cheapest only when their interquartile ranges do not overlap: a
difference inside the spread is not a difference.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..nn import set_topk
from .bench.timing import round_robin_samples

PAD_GREY = 114 / 255  # LetterBox's padding value, as the model sees it


@dataclass
class Latency:
    """Milliseconds per image of one k over the rounds: median and interquartile range (``low``, ``high``); the
    median of its per-round differences to the cheapest k (``diff``), and whether the two IQRs overlap
    (``like_cheapest``: the difference is inside the spread, not to be ranked)."""

    median: float
    low: float
    high: float
    diff: float
    like_cheapest: bool

    def to_json(self) -> dict:
        return {"median": self.median, "p25": self.low, "p75": self.high, "vs_cheapest": self.diff,
                "like_cheapest": self.like_cheapest}  # fmt: skip


def summarize(samples: dict[int, list[float]]) -> dict[int, Latency]:
    """Median and IQR of each k's per-round milliseconds, compared with the smallest k.

    Args:
        samples: ``{k: [ms per image in round 0, round 1, ...]}``, the rounds interleaved over k.
    """
    cheapest = samples[min(samples)]
    cheapest_low, cheapest_high = np.percentile(cheapest, [25, 75])
    latency = {}
    for k, times in sorted(samples.items()):
        low, median, high = (float(q) for q in np.percentile(times, [25, 50, 75]))
        diff = float(np.median(np.subtract(times, cheapest)))
        latency[k] = Latency(median, low, high, diff, bool(low <= cheapest_high and cheapest_low <= high))
    return latency


def machine_label(device: torch.device) -> str:
    """The machine a latency was measured on: the GPU's name and memory, or the CPU's model and torch's threads."""
    from ultralytics.utils.torch_utils import get_cpu_info, get_gpu_info

    if device.type == "cuda":
        return f"{get_gpu_info(device.index or 0)} (CUDA), torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{get_cpu_info()}, {threads} torch thread{'s' * (threads > 1)}, torch {torch.__version__}"


def measure_latency(
    model: nn.Module,
    ks: list[int],
    imgsz: int | tuple[int, int],
    device: torch.device,
    rounds: int = 20,
    calls: int = 5,
    warmup: int = 2,
) -> dict[int, Latency]:
    """Time one forward pass per k of a fused copy of ``model`` (eval mode, as ``predict`` runs it) on a grey
    ``imgsz`` image, batch 1.

    Each round calls every k ``calls`` times, k after k, after ``warmup`` untimed rounds; a k's sample of a round is
    its mean per call. Pre- and postprocessing (letterbox, NMS) are not included: they do not depend on k.

    Args:
        model: The task model (``yolo.model``); not modified.
        ks: Top-k values to time.
        imgsz: Deployment image size (square if an int).
        device: Where to run.
        rounds: Timed rounds.
        calls: Forward passes per k per round.
        warmup: Untimed rounds first.

    Returns:
        ``{k: Latency}`` in milliseconds per image.
    """
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    fused = copy.deepcopy(model).float().to(device).eval().fuse(verbose=False)
    image = torch.full((1, fused.yaml.get("channels", 3), height, width), PAD_GREY, device=device)

    def forward(copy_at_k: nn.Module) -> None:
        for _ in range(calls):
            copy_at_k(image)

    variants = {}
    for k in ks:
        copy_at_k = copy.deepcopy(fused)
        set_topk(copy_at_k, k)
        variants[str(k)] = functools.partial(forward, copy_at_k)
    with torch.inference_mode():
        samples = round_robin_samples(variants, rounds, warmup, device)
    return summarize({k: [ms / calls for ms in samples[str(k)]] for k in ks})


def format_ms(latency: Latency) -> str:
    """E.g. ``6.71 (6.52-6.90)``: median and interquartile range."""
    return f"{latency.median:.2f} ({latency.low:.2f}-{latency.high:.2f})"


def format_vs_cheapest(latency: Latency, cheapest: int) -> str:
    """``≈ k=0`` inside the spread, else the median paired difference, e.g. ``+0.42 ms``."""
    return f"≈ k={cheapest}" if latency.like_cheapest else f"{latency.diff:+.2f} ms"
