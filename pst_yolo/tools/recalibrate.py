"""``pst-yolo recalibrate``: recompute the fine-map statistics of a PST checkpoint from images.

The fine K/V of each PSA module are normalised with statistics tracked during training (``fine_kv_mean`` /
``fine_kv_var``). AMP training with pst-yolo < 0.2 overflowed them to inf/NaN, and the fine attention (top-k > 0) of
such a checkpoint gives NaN. This tool recomputes them from a few batches of the user's images, as
``torch.optim.swa_utils.update_bn`` recomputes BatchNorm statistics: per module, the batch statistics of the shared
K/V conv on its fine map, averaged over the batches. The model runs in eval mode at top-k 0, as it trained (coarse
attention only), so that no fine branch reads the statistics being rebuilt; every other tensor is left as it is.

    pst-yolo recalibrate model=best.pt source=path/to/train/images            # writes best-recalibrated.pt
    pst-yolo recalibrate model=best.pt source=images/ imgsz=640 batch=16 batches=8 out=fixed.pt
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..nn import PSAttn
from ..ops.statistics import pointwise_conv_moments
from .calibration import letterboxed_files

USAGE = "usage: pst-yolo recalibrate model=best.pt source=DIR [imgsz=640] [batch=16] [batches=8] [out=FILE]"


@torch.no_grad()
def recompute_fine_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every PSA module's fine-map statistics to their average over ``batches`` of images (B, 3, H, W).

    Returns:
        How many PSA modules were recomputed.

    Raises:
        ValueError: When a PSA module's K/V BatchNorm was fused away (``fuse()``): its fold needs the BatchNorm.
    """
    modules = [m for m in model.modules() if isinstance(m, PSAttn) and m.kv_fine is None]
    if any(getattr(m.kv, "bn", None) is None for m in modules):
        raise ValueError("recalibrate needs an unfused model (its K/V BatchNorm); load the checkpoint before fuse().")
    sums: dict[PSAttn, list[torch.Tensor]] = {}
    count = 0

    def accumulate(module: PSAttn, inputs: tuple) -> None:
        mean, var = pointwise_conv_moments(inputs[0], module.kv.conv.weight)
        if module in sums:
            sums[module][0] += mean
            sums[module][1] += var
        else:
            sums[module] = [mean, var]

    hooks = [m.register_forward_pre_hook(accumulate) for m in modules]
    was_training = model.training
    PSAttn.override_topk(0)
    try:
        model.eval()
        for images in batches:
            model(images)
            count += 1
    finally:
        PSAttn.override_topk(None)
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not count:
        raise ValueError("recalibrate: no images to compute the statistics from.")
    for module, (mean, var) in sums.items():
        module.fine_kv_mean.copy_(mean / count)
        module.fine_kv_var.copy_(var / count)
    return len(sums)


def image_batches(source: Path, imgsz: int, batch: int, batches: int) -> Iterator[torch.Tensor]:
    """Up to ``batches`` batches (B, 3, imgsz, imgsz) float32 in [0, 1] of the images in ``source``, letterboxed as
    Ultralytics' validation does, in sorted file order."""
    from ultralytics.data.utils import IMG_FORMATS

    files = sorted(p for p in source.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)[: batch * batches]
    if not files:
        raise SystemExit(f"pst-yolo recalibrate: no images in '{source}'.")
    for start in range(0, len(files), batch):
        yield letterboxed_files(files[start : start + batch], (imgsz, imgsz))


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments -> keyword arguments of :func:`run`."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"model", "source", "imgsz", "batch", "batches", "out"}
    if len(options) != len(argv) or unknown or not {"model", "source"} <= set(options):
        raise SystemExit(f"pst-yolo recalibrate: bad arguments {argv}.\n{USAGE}")
    model, source = Path(options["model"]), Path(options["source"])
    if model.suffix != ".pt" or not model.is_file():
        raise SystemExit(f"pst-yolo recalibrate: model must be a checkpoint file (.pt), got '{model}'.")
    if not source.is_dir():
        raise SystemExit(f"pst-yolo recalibrate: source must be a folder of images, got '{source}'.")
    sizes = {}
    for key, default in (("imgsz", 640), ("batch", 16), ("batches", 8)):
        value = options.get(key, str(default))
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"pst-yolo recalibrate: {key} must be a positive integer, got '{value}'.")
        sizes[key] = int(value)
    out = Path(options.get("out", model.with_name(f"{model.stem}-recalibrated.pt")))
    return {"model": model, "source": source, "out": out, **sizes}


def run(model: Path, source: Path, out: Path, imgsz: int, batch: int, batches: int) -> Path:
    """Recompute the fine statistics of checkpoint ``model`` on images of ``source``; save to ``out``."""
    from ultralytics import YOLO

    yolo = YOLO(str(model))
    net = yolo.model.float()
    done = recompute_fine_statistics(net, image_batches(source, imgsz, batch, batches))
    if not done:
        raise SystemExit(f"pst-yolo recalibrate: {model} has no PSA module with fine-map statistics.")
    yolo.save(str(out))
    print(f"pst-yolo recalibrate: fine-map statistics of {done} PSA modules recomputed; saved {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``pst-yolo recalibrate``."""
    import sys

    run(**parse_args(list(sys.argv[1:] if argv is None else argv)))
