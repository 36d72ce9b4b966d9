"""The model section of ``pst-yolo bench`` in PyTorch: fused eval models (the stock ones and PST ones at top-k 0
and k per backend) built from their YAMLs with random weights, timed round-robin per batch size."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .timing import time_round_robin


def build_model(name: str, device: torch.device):
    """Untrained detection model from ``<name>.yaml`` (stock Ultralytics or pst_yolo's), fused, eval, on device."""
    from ultralytics.nn.tasks import DetectionModel

    import pst_yolo  # noqa: F401  (registers the PST modules and configs)

    return DetectionModel(f"{name}.yaml", verbose=False).fuse(verbose=False).eval().to(device)


def is_pst(model: torch.nn.Module) -> bool:
    """Whether ``model`` has PSA attention modules."""
    from ...nn import PSAttn

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
    """A call of ``model`` on ``x`` (B, 3, H, W) at ``topk`` (None: leave the model's as it is, for stock models) with
    the attention ``backend``."""
    from ...nn import set_topk
    from ...ops import use_backend

    def run():
        if topk is not None:
            set_topk(model, topk)
        with use_backend(backend):
            return model(x)

    return run


def bench_models_eager(args, variants: dict, device) -> list[dict]:
    """Median ms of each variant (:func:`model_variants`) on random (batch, 3, imgsz, imgsz) images per batch of
    ``args.model_batches``, round-robin under ``inference_mode``: one row per variant and batch."""
    rows = []
    for batch in args.model_batches:
        x = torch.rand(batch, 3, args.imgsz, args.imgsz, device=device)
        calls = {label: forward_with_topk(*variant[:3], x) for label, variant in variants.items()}
        with torch.inference_mode():
            ms = time_round_robin(calls, args.repeats, args.warmup, device, args.clock)
        rows += [{"runtime": "pytorch", "model": label, "batch": batch, "ms": t} for label, t in ms.items()]
        print(f"pytorch batch {batch}: " + ", ".join(f"{label}: {t:.1f} ms" for label, t in ms.items()))
    return rows
