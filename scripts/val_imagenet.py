"""Validate a classifier on ImageNet val (top-1 / top-5, paper Table 3), fine attention off and on.

    python scripts/val_imagenet.py --weights runs/imagenet/yolo11n-cls-pst/weights/best.pt --imagenet /data/imagenet

Ultralytics' classification validator at 224 (Table 3) on ``val/<class>/*.JPEG``, once per top-k (a model without PSA
modules, e.g. a stock baseline, once). The rows are written as JSON (default: ``imagenet_val.json`` in the run
folder) for scripts/reproduce_tables.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEVICE_HINT = "Pass --device cpu or an id that exists."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="trained checkpoint (best.pt)")
    p.add_argument(
        "--imagenet",
        type=Path,
        default=Path("datasets/imagenet"),
        help="ImageNet folder (train/ for class names, val/)",
    )
    p.add_argument("--topk", type=int, nargs="+", default=[0, 8], help="top-k values to evaluate (0 = coarse only)")
    p.add_argument("--imgsz", type=int, default=224, help="image size (Table 3: 224)")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--device", default="0", help="Ultralytics device (one GPU, or cpu)")
    p.add_argument("--out", type=Path, help="JSON to write (default: imagenet_val.json next to weights/)")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Exit with a clear message when the weights, the ImageNet val split or the GPU are missing."""
    from pst_yolo.tools.datasets import exit_unless_ready, missing_imagenet_paths

    if not args.weights.is_file():
        raise SystemExit(f"Weights not found: {args.weights}")
    missing = missing_imagenet_paths(args.imagenet)  # Ultralytics reads the class names from train/
    exit_unless_ready("ImageNet data set", missing, args.device, DEVICE_HINT)


def validate(args: argparse.Namespace, topk: int | None) -> dict:
    """One Ultralytics val pass at ``topk`` (None: the model has no PSA module); top-1 / top-5 as fractions."""
    from ultralytics import YOLO

    from pst_yolo import set_topk

    model = YOLO(str(args.weights))
    if topk is not None:
        set_topk(model.model, topk)
    metrics = model.val(
        data=str(args.imagenet.resolve()), split="val", imgsz=args.imgsz, batch=args.batch, device=args.device,
        project=str(args.out.parent), name=f"val-k{topk}" if topk is not None else "val", exist_ok=True,
    )  # fmt: skip
    return {"topk": topk, "top1": float(metrics.top1), "top5": float(metrics.top5),
            "ms_per_img": metrics.speed["inference"], "val_dir": str(metrics.save_dir)}  # fmt: skip


def has_psa(weights: Path) -> bool:
    """Whether the checkpoint has PSA modules (a PST model) at all."""
    from ultralytics import YOLO

    from pst_yolo import PSAttn

    return any(isinstance(m, PSAttn) for m in YOLO(str(weights)).model.modules())


def main(argv: list[str] | None = None) -> None:
    """Check inputs, validate at each top-k, write the JSON."""
    args = parse_args(argv)
    check_inputs(args)
    args.out = (args.out or args.weights.resolve().parent.parent / "imagenet_val.json").resolve()
    rows = [validate(args, k) for k in args.topk] if has_psa(args.weights) else [validate(args, None)]
    args.out.write_text(
        json.dumps({"weights": str(args.weights.resolve()), "imgsz": args.imgsz, "rows": rows}, indent=2)
    )
    print("\n| top-k | top-1 | top-5 | ms/img |\n|---|---|---|---|")
    for r in rows:
        print(f"| {'-' if r['topk'] is None else r['topk']} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} "
              f"| {r['ms_per_img']:.2f} |")  # fmt: skip
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
