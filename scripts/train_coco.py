"""Train a PST detector on COCO 2017 with the paper's recipe (Table 5), DDP on 8 GPUs, global batch 256.

    python scripts/train_coco.py --model yolo11n-pst.yaml --coco /data/coco            # YOLOv11-PST-N
    python scripts/train_coco.py --model yolo11s-pst.yaml --coco /data/coco            # YOLOv11-PST-S (det-s recipe)
    python scripts/train_coco.py --model yolo12n-pst.yaml --coco /data/coco            # YOLOv12-PST-N
    python scripts/train_coco.py --model yolo11n.yaml --coco /data/coco --recipe det-n # the YOLO11-N baseline

The recipe (cfg/recipes/pst-det-{n,s,m}.yaml) follows the model's scale letter unless --recipe is given; any
``key=value`` after the options overrides it (e.g. ``epochs=300``). ``--coco`` is a folder in Ultralytics' COCO
layout (see ``pst_yolo.tools.datasets.missing_coco_paths``). Training runs coarse-only (the fine branch is an inference
switch); the final validation uses the model's top-k (8). Evaluate with scripts/val_coco.py afterwards.
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
    p.add_argument("--model", default="yolo11n-pst.yaml", help="model YAML (PST or stock baseline) or .pt to finetune")
    p.add_argument("--coco", type=Path, default=Path("datasets/coco"), help="COCO folder in Ultralytics' layout")
    p.add_argument("--recipe", choices=("det-n", "det-s", "det-m"), help="recipe (default: from the scale letter)")
    p.add_argument("--devices", default=DEFAULT_DEVICES, help="GPU ids for DDP (the paper: 8 GPUs)")
    p.add_argument("--project", type=Path, default=Path("runs/coco"), help="Ultralytics project folder")
    p.add_argument("--name", help="run name (default: the model name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics train arguments over the recipe")
    return p.parse_args(argv)


def recipe_for(model: str, recipe: str | None) -> Path:
    """The recipe file: ``recipe`` if given, else det-n/s/m from the model's scale letter."""
    from ultralytics.nn.tasks import guess_model_scale

    from pst_yolo.recipes import recipe_path

    if recipe is None:
        scale = guess_model_scale(model)
        if scale not in ("n", "s", "m"):
            raise SystemExit(f"Cannot tell the scale of {model} (got {scale!r}); pass --recipe det-n|det-s|det-m.")
        recipe = f"det-{scale}"
    return recipe_path(recipe)


def check_inputs(args: argparse.Namespace) -> None:
    """Exit with a clear message when the COCO folder or the requested GPUs are missing."""
    from pst_yolo.tools.datasets import exit_unless_ready, missing_coco_paths

    exit_unless_ready("COCO data set", missing_coco_paths(args.coco), args.devices, DEVICE_HINT)


def main(argv: list[str] | None = None) -> None:
    """Check inputs, write the data YAML, train with the recipe."""
    args = parse_args(argv)
    from pst_yolo.recipes import parse_overrides

    overrides = parse_overrides(args.overrides)
    check_inputs(args)
    from ultralytics import YOLO

    import pst_yolo  # noqa: F401  registers PST with Ultralytics' parser
    from pst_yolo.tools.datasets import write_coco_data_yaml

    recipe = recipe_for(args.model, args.recipe)
    name = args.name or Path(args.model).stem
    data = write_coco_data_yaml(args.coco, args.project.resolve() / name)
    print(f"train_coco: {args.model} with {recipe} on {data}, devices {args.devices}", flush=True)
    YOLO(args.model).train(
        cfg=str(recipe), data=str(data), device=args.devices, project=str(args.project.resolve()), name=name,
        exist_ok=True, **overrides,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
