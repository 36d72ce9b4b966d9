"""Multi-seed accuracy of stock and PST models on the offline digits data, with top-k sweeps.

Detection (default): YOLO12n, YOLOv11-PST-N and YOLOv12-PST-N. ``--task semantic`` / ``--task depth``: YOLO26n-sem
against YOLO26n-sem-PST, YOLO26n-depth against YOLO26n-depth-PST (mIoU / delta1), on the digits sets of
``pst_yolo.tools.task_datasets``; the P2 detection pair is ``--models yolo26n-p2.yaml yolo26n-p2-pst.yaml``.

For each seed: build the task's digits data set with that seed, train every model from scratch with the demo's
training code and short schedule (same epochs, image size, batch, seed), validate the stock model once and each PST
model at every k of ``--ks`` (one load per model, ``pst_yolo.tools.topk.sweep``). Each (seed, model) result is saved
as soon as it exists (``OUT/results/``), so an interrupted run resumes where it stopped. At the end the Markdown
tables (mean +- sample std over seeds, paired differences) go to ``OUT/accuracy.md``, a plot of mAP against k to
``OUT/accuracy.png`` and all numbers to ``OUT/accuracy.json``. Seeds may run as parallel processes sharing ``--out``;
a last call with all the seeds (same settings) reads their saved results and writes the tables. The tables in
docs/ACCURACY.md were made by (one thread per process: on the shared CPU, two OpenMP threads ran 3x slower):

    for s in 1 2 3; do OMP_NUM_THREADS=1 nice -n 10 python scripts/accuracy.py --seeds $s & done; wait
    python scripts/accuracy.py --seeds 1 2 3    # the default --out runs/accuracy

and its section on the dense tasks and P2 (each line run per seed in parallel first, as above) by:

    python scripts/accuracy.py --task semantic --ks 0 8 --epochs 10 --imgsz 64 --train-images 150 --val-images 50 \
        --out runs/accuracy-semantic
    (the same with --task depth --out runs/accuracy-depth, and with
     --models yolo26n-p2.yaml yolo26n-p2-pst.yaml --out runs/accuracy-p2)

Not part of CI (about an hour on a shared 2-core CPU, minutes on a GPU with ``--device 0``);
``--epochs 1 --train-images 16 --val-images 8 --imgsz 64`` is a smoke test of a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

TASK_MODELS = {
    "detect": ("yolo12n.yaml", "yolo11n-pst.yaml", "yolo12n-pst.yaml"),
    "semantic": ("yolo26n-sem.yaml", "yolo26n-sem-pst.yaml"),
    "depth": ("yolo26n-depth.yaml", "yolo26n-depth-pst.yaml"),
}
TASK_METRICS = {  # (secondary, primary = the validator's fitness) of pst_yolo.tools.topk.headline_metrics
    "detect": ("mAP50", "mAP50-95"),
    "semantic": ("pixel_acc", "mIoU"),
    "depth": ("delta2", "delta1"),
}
PAPER = {  # COCO val mAP50-95 (%), paper Table 2 and Table 4a (YOLOv11-PST-N)
    "table2": {"yolo12n": 40.6, "yolo11n (YOLO11-N)": 39.4, "yolo11n-pst": 40.3, "yolo12n-pst": 42.6},
    "table4a": {0: 40.2, 8: 40.3, 16: 39.5, 32: 38.9},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one data set and training per seed")
    p.add_argument("--task", choices=list(TASK_MODELS), default="detect", help="data set, default models, metrics")
    p.add_argument("--models", nargs="+", help="model YAMLs; the first is the reference (default: the task's)")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="top-k sweep of each PST model")
    p.add_argument("--default-k", type=int, default=8, help="the PST models' shipped top-k (paper default)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--imgsz", type=int, default=96, help="the demo's 128 px did not fit the CPU budget")
    p.add_argument("--train-images", type=int, default=300)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/accuracy"))
    args = p.parse_args(argv)
    args.models = args.models or list(TASK_MODELS[args.task])
    return args


def run_one(seed: int, model_cfg: str, args: argparse.Namespace) -> dict:
    """Build seed's data (once), train ``model_cfg``, validate it (every k of ``args.ks`` for a PST model)."""
    from ultralytics import YOLO

    from pst_yolo.tools import demo, topk
    from pst_yolo.tools.datasets import build_digits_detection
    from pst_yolo.tools.task_datasets import build_digits_task

    data_dir = args.out / f"data-seed{seed}"
    data = data_dir / "data.yaml"
    if not data.is_file():
        sizes = args.train_images, args.val_images, args.imgsz, seed
        data = (
            build_digits_detection(data_dir, *sizes)
            if args.task == "detect"
            else build_digits_task(data_dir, args.task, *sizes)
        )
    train_args = argparse.Namespace(**{**vars(args), "seed": seed})
    project = args.out / "runs" / f"seed{seed}"
    run_dir, train_s = demo.train(model_cfg, data, train_args, project)
    yolo = YOLO(str(run_dir / "weights" / "best.pt"))
    val_kwargs = {"data": str(data), "imgsz": args.imgsz, "batch": args.batch, "device": args.device,
                  "workers": args.workers}  # fmt: skip
    save_dir = project / f"{Path(model_cfg).stem}-val"
    if topk.count_psa(yolo.model):
        rows = topk.sweep(yolo, args.ks, save_dir, **val_kwargs)
    else:
        rows = [{"k": None, **topk.validate(yolo, save_dir, "stock", **val_kwargs)}]
    return {"seed": seed, "model": Path(model_cfg).stem, "train_s": train_s, "run_dir": str(run_dir), "rows": rows}


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """'mean +- std' (sample std) of values x scale, one decimal; a single value has no std."""
    values = [v * scale for v in values]
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def metric(result: dict, k: int | None, name: str) -> float:
    """Metric ``name`` of ``result`` at top-k ``k`` (None for a stock model)."""
    return next(r[name] for r in result["rows"] if r["k"] == k)


def tables(results: list[dict], args: argparse.Namespace) -> str:
    """The Markdown tables: models at k=0 and the default k vs the reference model, then each PST model's sweep."""
    seeds = sorted({r["seed"] for r in results})
    by = {(r["model"], r["seed"]): r for r in results}
    models = [Path(m).stem for m in args.models if all((Path(m).stem, s) in by for s in seeds)]
    ref = models[0]
    second, first = TASK_METRICS[args.task]

    def paired(model: str, k, ref_model: str, ref_k) -> list[float]:
        return [metric(by[model, s], k, first) - metric(by[ref_model, s], ref_k, first) for s in seeds]

    def variants(model: str) -> list:
        return [None] if by[model, seeds[0]]["rows"][0]["k"] is None else sorted({0, args.default_k})

    out = [
        (
            f"Seeds {', '.join(map(str, seeds))}; {args.epochs} epochs at {args.imgsz} px, {args.train_images} train / "
            f"{args.val_images} val images, batch {args.batch}. {first} and {second} in %, mean ± sample std over "
            "seeds; "
            f"'vs {ref}' is the per-seed difference (same data and seed): mean ± std, and in how many seeds it is > 0."
        ),
        "",
        f"| model | k | {second} | {first} | {first} per seed | vs {ref} ({first}) | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for k in variants(model):
            per_seed = [metric(by[model, s], k, first) for s in seeds]
            diff = paired(model, k, ref, None) if model != ref else None
            wins = f", {sum(d > 0 for d in diff)}/{len(diff)} > 0" if diff else ""
            out.append(
                f"| {model} | {'-' if k is None else k} "
                f"| {mean_std([metric(by[model, s], k, second) for s in seeds])} "
                f"| {mean_std(per_seed)} | {' / '.join(f'{100 * v:.1f}' for v in per_seed)} "
                f"| {mean_std(diff) + wins if diff else '-'} "
                f"| {statistics.mean(by[model, s]['train_s'] for s in seeds):.0f} |"
            )
    out += ["", "Top-k sweep of each PST model (same trained weights, fine attention set at validation only):", "",
            f"| model | k | {second} | {first} | vs k=0 ({first}, per seed) | inference (ms/img) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for model in models:
        if variants(model) == [None]:
            continue
        for k in args.ks:
            diff = paired(model, k, model, 0)
            out.append(
                f"| {model} | {k} | {mean_std([metric(by[model, s], k, second) for s in seeds])} "
                f"| {mean_std([metric(by[model, s], k, first) for s in seeds])} "
                f"| {'-' if k == 0 else mean_std(diff) + f' ({sum(d > 0 for d in diff)}/{len(diff)} > 0)'} "
                f"| {statistics.mean(metric(by[model, s], k, 'inference_ms') for s in seeds):.1f} |"
            )
    return "\n".join(out)


def plot_sweeps(results: list[dict], path: Path, name: str = "mAP50-95") -> Path:
    """Metric ``name`` against k for each PST model: mean over seeds with a +-1 std band, each seed a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), tight_layout=True)
    for model in sorted({r["model"] for r in results if r["rows"][0]["k"] is not None}):
        runs = [r for r in results if r["model"] == model]
        ks = [row["k"] for row in runs[0]["rows"]]
        maps = 100 * np.array([[metric(r, k, name) for k in ks] for r in runs])  # (seeds, ks)
        (line,) = ax.plot(ks, maps.mean(0), marker="o", label=f"{model} (mean of {len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(ks, maps.mean(0) - maps.std(0, ddof=1), maps.mean(0) + maps.std(0, ddof=1), alpha=0.15)
        for seed_maps in maps:
            ax.plot(ks, seed_maps, color=line.get_color(), lw=0.6, alpha=0.5)
    stock = [r for r in results if r["rows"][0]["k"] is None]
    for r in stock:
        ax.axhline(100 * r["rows"][0][name], color="grey", lw=0.6, ls="--")
    if stock:
        names = ", ".join(sorted({r["model"] for r in stock}))
        ax.plot([], [], color="grey", lw=0.6, ls="--", label=f"{names} (no top-k), one line per seed")
    ax.set_xlabel("top-k at validation (0 = coarse attention only)")
    ax.set_ylabel(f"{name} (%)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    for key, value in {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false",
                       "YOLO_CONFIG_DIR": str(args.out / "ultralytics-config")}.items():  # fmt: skip
        os.environ.setdefault(key, value)  # read when Ultralytics is imported, i.e. by the imports below
    from pst_yolo.tools.demo import install_offline_font

    install_offline_font(args.out)
    (args.out / "results").mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), []
    for seed in args.seeds:
        for model_cfg in args.models:
            path = args.out / "results" / f"seed{seed}-{Path(model_cfg).stem}.json"
            if not path.is_file():
                print(
                    f"\n=== accuracy: seed {seed}, {model_cfg} ({time.perf_counter() - start:.0f} s so far)", flush=True
                )
                path.write_text(json.dumps(run_one(seed, model_cfg, args), indent=2))
            results.append(json.loads(path.read_text()))
    markdown = tables(results, args)
    (args.out / "accuracy.md").write_text(markdown + "\n")
    plot_sweeps(results, args.out / "accuracy.png", TASK_METRICS[args.task][1])
    (args.out / "accuracy.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "paper": PAPER, "results": results}, indent=2))  # fmt: skip
    print(f"\n{markdown}\n\nwall time {time.perf_counter() - start:.0f} s; tables in {args.out / 'accuracy.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
