"""Train a PST classifier (PST-CLS) on ImageNet with the paper's recipe (Table 5), DDP on 8 GPUs, global batch 256.

    python scripts/train_imagenet.py --model yolo11n-cls-pst.yaml --imagenet /data/imagenet   # YOLOv11-cls-PST-N
    python scripts/train_imagenet.py --model r18-cls-pst.yaml --imagenet /data/imagenet       # R-18-PST-N (cls)
    python scripts/train_imagenet.py --model yolo11n-cls.yaml --imagenet /data/imagenet       # the baseline

The recipe is cfg/recipes/pst-cls.yaml (200 epochs, SGD, lr 0.2 -> 2e-3, imgsz 224); any ``key=value`` after the
options overrides it (e.g. ``lr0=0.1`` for Section 4.1's rate). ``--imagenet`` is a folder in Ultralytics'
classification layout: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``. Evaluate with scripts/val_imagenet.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DEVICES = "0,1,2,3,4,5,6,7"


DEVICE_HINT = "Pass --devices with the GPUs you have (the recipe's batch 256 is global)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; trailing ``key=value`` pairs are collected as Ultralytics overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="yolo11n-cls-pst.yaml", help="classification model YAML, or .pt to finetune")
    p.add_argument("--imagenet", type=Path, default=Path("datasets/imagenet"), help="ImageNet folder (train/, val/)")
    p.add_argument("--devices", default=DEFAULT_DEVICES, help="GPU ids for DDP (the paper: 8 GPUs)")
    p.add_argument("--project", type=Path, default=Path("runs/imagenet"), help="Ultralytics project folder")
    p.add_argument("--name", help="run name (default: the model name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics train arguments over the recipe")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Exit with a clear message when the ImageNet folder or the requested GPUs are missing."""
    from pst_yolo.tools.datasets import exit_unless_ready, missing_imagenet_paths

    exit_unless_ready("ImageNet data set", missing_imagenet_paths(args.imagenet), args.devices, DEVICE_HINT)


def main(argv: list[str] | None = None) -> None:
    """Check inputs, train with the PST-CLS recipe."""
    args = parse_args(argv)
    from pst_yolo.recipes import parse_overrides

    overrides = parse_overrides(args.overrides)
    check_inputs(args)
    from ultralytics import YOLO

    from pst_yolo.recipes import recipe_path

    recipe = recipe_path("cls")
    name = args.name or Path(args.model).stem
    print(f"train_imagenet: {args.model} with {recipe} on {args.imagenet}, devices {args.devices}", flush=True)
    YOLO(args.model, task="classify").train(
        cfg=str(recipe), data=str(args.imagenet.resolve()), device=args.devices,
        project=str(args.project.resolve()), name=name, exist_ok=True, **overrides,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
