"""Head start from stock weights, on the offline digits data: is a stock checkpoint a useful start for a PST model?

    python scripts/head_start.py --markdown-out docs/HEAD_START.md          # detection, ~15 min on a 2-core CPU
    python scripts/head_start.py --task segment --model yolo11n-seg-pst.yaml

1. Data: the digits set of the task (``pst_yolo.tools.datasets`` / ``task_datasets``), built once.
2. The stock model the PST config extends (``pst_yolo.configs.stock_counterpart``: yolo11n-pst -> yolo12n) trained
   from scratch for ``--pretrain-epochs``: the stand-in for a stock checkpoint such as ``yolo12n.pt``.
3. Four runs of ``--epochs`` each, same schedule, seed, data and batch:
   - stock, continued: the stock checkpoint trained ``--epochs`` more (what the stock user gets for the same budget);
   - PST, transferred: ``yolo train model=PST.yaml pretrained=stock.pt`` (``BaseModel.load``: every tensor outside the
     PST rows), fine-tuned;
   - PST, transferred, ``freeze=--freeze``: the same with the first layers (the backbone) frozen;
   - PST, from scratch.
Each run's final validation (best.pt; PST with its default top-k 8) goes in a Markdown table and ``summary.json``.
Ultralytics' variables are set to offline defaults (and a private config dir under ``--out``) before it is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SHORT_SCHEDULE = {"optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1, "close_mosaic": 3}  # as pst-yolo demo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="detect", choices=("detect", "segment", "pose", "obb"))
    p.add_argument("--model", default="yolo11n-pst.yaml", help="PST config (its stock counterpart is derived)")
    p.add_argument("--pretrain-epochs", type=int, default=15, help="epochs of the stock model before the comparison")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each compared run")
    p.add_argument(
        "--freeze", type=int, default=9, help="layers frozen in the frozen-backbone run (9: YOLO12 backbone)"
    )
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/head-start"))
    p.add_argument("--markdown-out", type=Path, help="write the table and the command that made it")
    return p.parse_args(argv)


def box_or_mask_metrics(metrics, task: str) -> dict[str, float]:
    """mAP50 / mAP50-95 of the task's own output (masks, keypoints, oriented boxes or boxes)."""
    part = {"segment": "seg", "pose": "pose"}.get(task, "box")
    result = getattr(metrics, part)
    return {"mAP50": float(result.map50), "mAP50-95": float(result.map)}


def train(cfg: str, label: str, data: Path, args: argparse.Namespace, epochs: int, **extra) -> dict:
    """Train ``cfg`` (a YAML, or a checkpoint to continue from) for ``epochs``; return one table row."""
    from ultralytics import YOLO

    start = time.perf_counter()
    model = YOLO(cfg, task=args.task)
    metrics = model.train(
        data=str(data), epochs=epochs, imgsz=args.imgsz, batch=args.batch, device=args.device, workers=0,
        seed=args.seed, deterministic=True, project=str(args.out / "runs"), name=label, exist_ok=True, plots=False,
        **SHORT_SCHEDULE, **extra,
    )  # fmt: skip
    row = {"run": label, "epochs": epochs, **box_or_mask_metrics(metrics, args.task)}
    row["train_s"] = time.perf_counter() - start
    row["best"] = str(Path(model.trainer.save_dir) / "weights" / "best.pt")
    return row


def markdown(rows: list[dict], args: argparse.Namespace, stock: str, command: str) -> str:
    lines = [
        f"| run ({args.task}, {args.epochs} epochs each) | start | mAP50 | mAP50-95 | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['start']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {r['train_s']:.0f} |")
    setup = (
        f"Stock model `{stock}` trained {args.pretrain_epochs} epochs from scratch on the digits set "
        f"({args.train_images} train / {args.val_images} val images at {args.imgsz} px, seed {args.seed}), then each "
        f"run below trained {args.epochs} epochs with the same schedule ({SHORT_SCHEDULE}, batch {args.batch})."
    )
    return f"Command: `{command}`\n\n{setup}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    for key, value in {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(args.out / "ultralytics-config"))

    from pst_yolo.configs import stock_counterpart
    from pst_yolo.tools.datasets import build_digits_detection
    from pst_yolo.tools.task_datasets import build_digits_task

    stock = stock_counterpart(args.model)
    if stock is None:
        raise SystemExit(f"{args.model} extends no stock model (see pst_yolo.configs.STOCK_COUNTERPARTS).")
    sizes = (args.train_images, args.val_images, args.imgsz, args.seed)
    if args.task == "detect":
        data = build_digits_detection(args.out / "data", *sizes)
    else:
        data = build_digits_task(args.out / "data", args.task, *sizes)
    pretrained = train(stock, "stock-pretrain", data, args, args.pretrain_epochs)["best"]
    pst = Path(args.model).stem
    runs = [
        (f"{Path(stock).stem}, continued", "stock checkpoint", pretrained, {}),
        (f"{pst}, transferred", "stock checkpoint, non-PST tensors", args.model, {"pretrained": pretrained}),
        (f"{pst}, transferred, freeze={args.freeze}", "the same, backbone frozen", args.model,
         {"pretrained": pretrained, "freeze": args.freeze}),
        (f"{pst}, from scratch", "random", args.model, {"pretrained": False}),
    ]  # fmt: skip
    rows = []
    for label, start, cfg, extra in runs:
        row = train(cfg, label.replace(", ", "-").replace(" ", "-").replace("=", ""), data, args, args.epochs, **extra)
        rows.append({**row, "run": label, "start": start})
    command = " ".join(["python scripts/head_start.py", *(sys.argv[1:] if argv is None else argv)])
    table = markdown(rows, args, stock, command)
    print("\n" + table)
    (args.out / "summary.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2, default=str)
    )
    if args.markdown_out:
        args.markdown_out.write_text(table)


if __name__ == "__main__":
    main()
