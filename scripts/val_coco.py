"""Validate a detector on COCO val2017 with COCO-API metrics, fine attention off and on (paper Tables 2 and 4a).

    python scripts/val_coco.py --weights runs/coco/yolo11n-pst/weights/best.pt --coco /data/coco           # k=0, k=8
    python scripts/val_coco.py --weights runs/coco/yolo11n-pst/weights/best.pt --coco /data/coco --sweep   # Table 4a
    python scripts/val_coco.py --weights runs/coco/yolo11n/weights/best.pt --coco /data/coco              # baseline

For each top-k, Ultralytics validates with ``save_json=True`` (COCO's 91 category ids, ``predictions.json``), then
the COCO API (faster-coco-eval, as Ultralytics uses, or pycocotools) scores it against
``annotations/instances_val2017.json``: AP, AP50, AP75, APs/m/l and AR. A model without PSA modules (a stock
baseline) is validated once. The rows are written as JSON (default: ``coco_val.json`` in the run folder) for
scripts/reproduce_tables.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PAPER_TOPKS = (0, 8, 16, 32)  # Table 4a
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


DEVICE_HINT = "Pass --device cpu or an id that exists."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="trained checkpoint (best.pt)")
    p.add_argument("--coco", type=Path, default=Path("datasets/coco"), help="COCO folder in Ultralytics' layout")
    p.add_argument("--topk", type=int, nargs="+", default=[0, 8], help="top-k values to evaluate (0 = coarse only)")
    p.add_argument("--sweep", action="store_true", help=f"evaluate top-k {PAPER_TOPKS} (paper Table 4a)")
    p.add_argument("--imgsz", type=int, default=640, help="image size (paper: 640)")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--device", default="0", help="Ultralytics device (one GPU, or cpu)")
    p.add_argument("--out", type=Path, help="JSON to write (default: coco_val.json next to weights/)")
    return p.parse_args(argv)


def coco_eval_classes():
    """(COCO, COCOeval) from faster-coco-eval (Ultralytics' choice) or pycocotools.

    Raises:
        SystemExit: Neither is installed.
    """
    try:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    except ImportError:
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError:
            raise SystemExit(
                "COCO-API metrics need faster-coco-eval or pycocotools: pip install faster-coco-eval"
            ) from None
    return COCO, COCOeval


def coco_api_stats(anno_json: Path, pred_json: Path, image_ids: list[int]) -> dict[str, float]:
    """COCO bbox metrics of ``pred_json`` on ``image_ids``: the 12 standard numbers, as fractions."""
    COCO, COCOeval = coco_eval_classes()
    ground_truth = COCO(str(anno_json))
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(pred_json)), "bbox")
    evaluator.params.imgIds = image_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats)}


def val2017_image_ids(coco: Path) -> list[int]:
    """COCO image ids of the images listed in ``val2017.txt`` (file stems, e.g. 000000000139 -> 139)."""
    lines = (coco / "val2017.txt").read_text().split()
    return [int(Path(line).stem) for line in lines]


def check_inputs(args: argparse.Namespace) -> None:
    """Exit with a clear message when the weights, COCO val2017, the COCO API or the GPU are missing."""
    from pst_yolo.tools.datasets import exit_unless_ready, missing_coco_paths

    if not args.weights.is_file():
        raise SystemExit(f"Weights not found: {args.weights}")
    exit_unless_ready("COCO val2017", missing_coco_paths(args.coco, splits=("val2017",)), args.device, DEVICE_HINT)
    coco_eval_classes()


def validate(args: argparse.Namespace, data: Path, topk: int | None) -> dict:
    """One Ultralytics val pass at ``topk`` (None: the model has no PSA module) scored with the COCO API."""
    from ultralytics import YOLO

    from pst_yolo import set_topk

    model = YOLO(str(args.weights))
    if topk is not None:
        set_topk(model.model, topk)
    metrics = model.val(
        data=str(data), imgsz=args.imgsz, batch=args.batch, device=args.device, save_json=True,
        project=str(args.out.parent), name=f"val-k{topk}" if topk is not None else "val", exist_ok=True,
    )  # fmt: skip
    stats = coco_api_stats(args.coco / "annotations" / "instances_val2017.json",
                           Path(metrics.save_dir) / "predictions.json", val2017_image_ids(args.coco))  # fmt: skip
    return {"topk": topk, **stats, "ms_per_img": metrics.speed["inference"], "val_dir": str(metrics.save_dir)}


def has_psa(weights: Path) -> bool:
    """Whether the checkpoint has PSA modules (a PST model) at all."""
    from ultralytics import YOLO

    from pst_yolo import PSAttn

    return any(isinstance(m, PSAttn) for m in YOLO(str(weights)).model.modules())


def print_rows(rows: list[dict]) -> None:
    """The rows as a Markdown table in percent (the paper's unit)."""
    print("\n| top-k | AP | AP50 | AP75 | APs | APm | APl | ms/img |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        aps = " | ".join(f"{100 * r[k]:.1f}" for k in COCO_STATS[:6])
        print(f"| {'-' if r['topk'] is None else r['topk']} | {aps} | {r['ms_per_img']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    """Check inputs, validate at each top-k, write the JSON."""
    args = parse_args(argv)
    check_inputs(args)
    from pst_yolo.tools.datasets import write_coco_data_yaml

    args.out = (args.out or args.weights.resolve().parent.parent / "coco_val.json").resolve()
    data = write_coco_data_yaml(args.coco, args.out.parent)
    topks = list(PAPER_TOPKS) if args.sweep else args.topk
    rows = [validate(args, data, k) for k in topks] if has_psa(args.weights) else [validate(args, data, None)]
    args.out.write_text(
        json.dumps({"weights": str(args.weights.resolve()), "imgsz": args.imgsz, "rows": rows}, indent=2)
    )
    print_rows(rows)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
