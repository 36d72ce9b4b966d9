"""``pst-yolo demo``: train and compare a PST detector and the stock YOLO it extends, on real data, offline, on CPU.

The data are real handwritten digits (scikit-learn's bundled scans, see ``pst_yolo.tools.datasets``) composited onto
textured backgrounds: 10 classes, YOLO labels, nothing downloaded. Both models train from scratch with the same
seed, epochs, image size, batch and data; both are validated, the PST model with fine attention off and on
(k=0 and k=8, paper Table 4a); a table of mAP50, mAP50-95, parameters, GFLOPs and validation time is printed and
saved as ``summary.json``; Ultralytics' plots (results.png, confusion matrices, val batch predictions) stay in the
run folders.

    pst-yolo demo                                   # defaults: a few minutes on a 2-core CPU
    pst-yolo demo --epochs 60 --imgsz 256 --train-images 2000 --val-images 400 --device 0

Ultralytics reads YOLO_OFFLINE, YOLO_AUTOINSTALL and YOLO_CONFIG_DIR when it is imported, and importing pst_yolo
imports Ultralytics, so when one of them is unset the demo sets it and restarts itself once in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..validation import argparse_type, check_int

OFFLINE_ENV = {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false"}
CONFIG_SUBDIR = "ultralytics-config"  # the demo's private YOLO_CONFIG_DIR inside --out
TOPKS = (0, 8)  # fine attention off / on (paper Table 4a)
# Short-schedule settings shared by both models: from-scratch training in a few hundred iterations needs a higher
# AdamW rate than Ultralytics' automatic choice for 10 classes (7e-4), one warm-up epoch and mosaic off at the end.
SHORT_SCHEDULE = {"optimizer": "AdamW", "lr0": 0.002, "warmup_epochs": 1, "close_mosaic": 3}
SEED_NOTE = (
    "One seed of a short run (seed {seed}): gaps of this size between the models, or between k=0 and k=8, are within "
    "seed-to-seed noise and are not evidence either way. Several seeds, each PST model's top-k sweep and the paper's "
    "figures: docs/ACCURACY.md; choose k on your own data with `pst-yolo topk`."
)


def count(name: str, minimum: int = 1):
    """argparse type: an integer >= ``minimum``; a bad value exits with a message naming the option."""
    return argparse_type(check_int, name, minimum=minimum)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of ``pst-yolo demo``."""
    p = argparse.ArgumentParser(prog="pst-yolo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=count("epochs"), default=15, help="training epochs for each model")
    p.add_argument("--imgsz", type=count("imgsz", 32), default=128, help="image size (data are drawn at this size)")
    p.add_argument("--train-images", type=count("train-images"), default=300, help="number of training images")
    p.add_argument("--val-images", type=count("val-images"), default=60, help="number of validation images")
    p.add_argument("--batch", type=count("batch"), default=8, help="batch size")
    p.add_argument("--model", default="yolo11n-pst.yaml", help="PST model YAML (authors' layout, on YOLO12)")
    p.add_argument("--baseline", default="yolo12n.yaml", help="stock Ultralytics model YAML to compare with")
    p.add_argument("--device", default="cpu", help="Ultralytics device: cpu, 0, 0,1 ...")
    p.add_argument(
        "--workers", type=count("workers", 0), default=0, help="dataloader workers (Ultralytics uses 0 on CPU)"
    )
    p.add_argument("--seed", type=count("seed", 0), default=0, help="seed for the data and both trainings")
    p.add_argument("--out", type=Path, default=Path("runs/pst-demo"), help="output folder (data, runs, summary)")
    return p.parse_args(argv)


def offline_env(out: Path) -> dict[str, str]:
    """``os.environ`` with the offline variables and a private YOLO_CONFIG_DIR added where unset."""
    env = dict(os.environ)
    for key, value in {**OFFLINE_ENV, "YOLO_CONFIG_DIR": str(out / CONFIG_SUBDIR)}.items():
        env.setdefault(key, value)
    return env


def relaunch_if_env_missing(argv: list[str], out: Path) -> None:
    """Re-run ``pst-yolo demo argv`` in a fresh interpreter with the offline variables set, if any was missing.

    Raises:
        SystemExit: With the child's exit code, after it ran.
    """
    env = offline_env(out)
    if env == dict(os.environ):
        return
    print(f"pst-yolo demo: setting {', '.join(sorted(env.keys() - os.environ.keys()))} and restarting", flush=True)
    raise SystemExit(subprocess.call([sys.executable, "-m", "pst_yolo", "demo", *argv], env=env))


def install_offline_font(out: Path) -> None:
    """Give Ultralytics' plots a local font in the demo's own config dir.

    Ultralytics' ``check_font`` looks for ``Arial.ttf`` in its config dir, then in matplotlib's font list, then tries
    to download it (a network request per plot; offline it returns None and PIL's default font is used). Copying
    matplotlib's bundled DejaVuSans.ttf there under that name makes plots font-complete with no network attempt.
    Only the demo's private config dir is touched, never a user's own YOLO_CONFIG_DIR.
    """
    from ultralytics.utils import USER_CONFIG_DIR

    if not Path(USER_CONFIG_DIR).resolve().is_relative_to((out / CONFIG_SUBDIR).resolve()):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)


def stage(message: str) -> None:
    """Print one progress line between Ultralytics' own output."""
    print(f"\n=== pst-yolo demo: {message}", flush=True)


def train(model_cfg: str, data: Path, args: argparse.Namespace, project: Path) -> tuple[Path, float]:
    """Train ``model_cfg`` from scratch; return its run folder and the training wall time in seconds."""
    from ultralytics import YOLO

    start = time.perf_counter()
    model = YOLO(model_cfg)
    model.train(
        data=str(data),
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        deterministic=True,
        project=str(project),
        name=Path(model_cfg).stem,
        exist_ok=True,
        plots=True,
        **SHORT_SCHEDULE,
    )
    return Path(model.trainer.save_dir), time.perf_counter() - start


def validate(weights: Path, data: Path, args: argparse.Namespace, project: Path, label: str, topk: int | None) -> dict:
    """Validate ``weights`` (top-k ``topk`` on every PSA module unless None) into ``project/<label>-val``.

    Returns:
        One row of the summary table.
    """
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    from ..nn import set_topk

    model = YOLO(str(weights))
    if topk is not None and set_topk(model.model, topk) == 0:
        raise SystemExit(f"pst-yolo demo: {weights} has no PSA module, so top-k {topk} cannot be set.")
    start = time.perf_counter()
    metrics = model.val(
        data=str(data), imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
        project=str(project), name=f"{label}-val", exist_ok=True, plots=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "model": label,
        "mAP50": float(metrics.box.map50),
        "mAP50-95": float(metrics.box.map),
        "params_M": get_num_params(model.model) / 1e6,  # fused by val, as the paper counts
        "GFLOPs_640": float(get_flops(model.model, 640)),
        "val_s": seconds,
        "infer_ms_per_img": float(metrics.speed["inference"]),
        "val_dir": str(metrics.save_dir),
    }


def format_table(rows: list[dict]) -> str:
    """The comparison table as Markdown."""
    lines = [
        "| model | mAP50 | mAP50-95 | params (M, fused) | GFLOPs @640 (Ultralytics) | val time (s) "
        "| inference (ms/img) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {r['params_M']:.2f} | {r['GFLOPs_640']:.1f} "
            f"| {r['val_s']:.1f} | {r['infer_ms_per_img']:.1f} |"
        )
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> dict:
    """Build the data, train both models, validate them and write ``summary.json``; return the summary."""
    from .datasets import build_digits_detection

    start = time.perf_counter()
    out, project = args.out, args.out / "runs"
    install_offline_font(out)
    stage(f"1/4 building {args.train_images} train + {args.val_images} val digit images at {args.imgsz} px")
    data = build_digits_detection(out / "data", args.train_images, args.val_images, args.imgsz, args.seed)
    stage(f"2/4 training the baseline {args.baseline} for {args.epochs} epochs on {args.device}")
    baseline_dir, baseline_train_s = train(args.baseline, data, args, project)
    stage(f"3/4 training the PST model {args.model} for {args.epochs} epochs on {args.device}")
    pst_dir, pst_train_s = train(args.model, data, args, project)
    stage("4/4 validating the baseline, then PST with fine attention off (k=0) and on (k=8)")
    baseline_name, pst_name = Path(args.baseline).stem, Path(args.model).stem
    rows = [validate(baseline_dir / "weights" / "best.pt", data, args, project, baseline_name, None)]
    rows += [validate(pst_dir / "weights" / "best.pt", data, args, project, f"{pst_name}-k{k}", k) for k in TOPKS]
    summary = {
        "args": {key: str(value) for key, value in vars(args).items()},
        "train_s": {baseline_name: baseline_train_s, pst_name: pst_train_s},
        "train_dirs": {baseline_name: str(baseline_dir), pst_name: str(pst_dir)},
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def report(summary: dict, out: Path) -> None:
    """Print the comparison table, timings and where the plots are."""
    print("\n" + format_table(summary["rows"]))
    print(f"\n{SEED_NOTE.format(seed=summary['args']['seed'])}")
    trains = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["train_s"].items())
    print(f"\ntraining: {trains}; demo wall time {summary['wall_s']:.0f} s; table saved to {out / 'summary.json'}")
    print("plots (results.png, confusion_matrix.png, val_batch*_pred.jpg):")
    for folder in [*summary["train_dirs"].values(), *(row["val_dir"] for row in summary["rows"])]:
        print(f"  {folder}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``pst-yolo demo``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out = args.out.resolve()
    relaunch_if_env_missing(argv, args.out)
    report(run_demo(args), args.out)


if __name__ == "__main__":
    main()
