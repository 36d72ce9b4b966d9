"""Choose the PSA top-k on your own data: validate a trained PST model at several k (paper Table 4a) in one load.

    pst-yolo topk model=best.pt [data=data.yaml] [ks=0,4,8,16,32] [save=True|K] [project=runs/pst-topk] [name=NAME]
                  [plots=False] [any other `yolo val` key, e.g. imgsz=640 batch=16 device=0 split=val]

Each k is validated by the task's own Ultralytics validator (``model.val``), so detection, segmentation, pose, OBB and
classification models all work; ``data`` and ``imgsz`` default to the ones the model was trained with. Prints a
Table 4a-style table (k, the task's two headline metrics, Ultralytics' fitness, inference ms/image from the
validator's speed dict) and writes ``topk.md``, ``topk.json`` and ``topk.png`` (metrics and latency against k) to
``project/name``. The best k is the one with the highest fitness (Ultralytics' own ``best.pt`` criterion: mAP50-95 for
detection, the mean of top-1 and top-5 for classification); ties go to the smaller, cheaper k. ``save=True`` writes a
copy of the checkpoint with the best k (``save=K``: with k = K) on every PSA module of its model and EMA and in its
YAML rows, so stock ``yolo val/predict/export`` use it by default and ``yolo train model=copy.pt`` keeps it. The
original checkpoint is never modified. Latency on a shared CPU is noisy: compare it on the machine you deploy on.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..nn import PST, PSAttn, set_topk

USAGE = __doc__.split("\n\n")[1]
DEFAULT_KS = (0, 4, 8, 16, 32)
DETECTION_METRIC = "metrics/mAP50-95("  # results_dict keys of detection-family metrics: box (B), mask (M), pose (P)


def headline_metrics(metrics) -> dict[str, float]:
    """The task's two headline numbers from an Ultralytics metrics object, plus its fitness.

    Detection-family tasks give ``mAP50`` and ``mAP50-95`` of their last metric group (box for detect/OBB, mask for
    segment, pose keypoints for pose); other tasks give their first two ``results_dict`` values (classification:
    ``accuracy_top1``, ``accuracy_top5``).
    """
    results = metrics.results_dict
    groups = [key[len(DETECTION_METRIC) : -1] for key in results if key.startswith(DETECTION_METRIC)]
    if groups:
        g = groups[-1]
        return {
            "mAP50": float(results[f"metrics/mAP50({g})"]),
            "mAP50-95": float(results[f"metrics/mAP50-95({g})"]),
            "fitness": float(results["fitness"]),
        }
    names = [key for key in results if key != "fitness"][:2]
    return {
        **{name.removeprefix("metrics/"): float(results[name]) for name in names},
        "fitness": float(metrics.fitness),
    }


def count_psa(model: nn.Module) -> int:
    """Number of PSA (top-k attention) modules in ``model``."""
    return sum(isinstance(m, PSAttn) for m in model.modules())


def sweep(yolo, ks: list[int], save_dir: Path, plots: bool = False, **val_kwargs) -> list[dict]:
    """Validate a loaded ``ultralytics.YOLO`` at each top-k of ``ks``; one row per k.

    Args:
        yolo: The loaded model (``YOLO("best.pt")``); its PSA modules' ``topk`` is left at the last k of ``ks``.
        ks: Top-k values (0 = coarse attention only).
        save_dir: Each k's validation run goes to ``save_dir/k<k>``.
        plots: Ultralytics' validation plots for each k.
        **val_kwargs: Passed to ``yolo.val`` (data, imgsz, batch, device, split ...).

    Returns:
        Rows ``{"k", <headline metrics>, "fitness", "inference_ms", "total_ms", "val_dir"}`` in the order of ``ks``.
    """
    if PSAttn.topk_override is not None:
        raise RuntimeError(f"pst-yolo topk: a process-wide top-k override ({PSAttn.topk_override}) is active; clear it "
                           "with PSAttn.override_topk(None) so each k of the sweep applies.")  # fmt: skip
    warm_up(yolo, val_kwargs.get("imgsz"), val_kwargs.get("device"))
    rows = []
    for k in ks:
        set_topk(yolo.model, k)
        rows.append({"k": k, **validate(yolo, save_dir, f"k{k}", plots, **val_kwargs)})
    return rows


def warm_up(yolo, imgsz: int | None, device: str | None, rounds: int = 2) -> None:
    """Predict on a blank image ``rounds`` times (fuses the model and warms the backend; Ultralytics does not warm up
    on CPU), so that the first k validated is not charged with the start-up time."""
    import numpy as np

    size = imgsz or yolo.overrides.get("imgsz") or 640
    height, width = (size, size) if isinstance(size, int) else size
    blank = np.full((height, width, 3), 114, dtype=np.uint8)  # LetterBox's padding grey
    for _ in range(rounds):
        yolo.predict(blank, imgsz=size, device=device, verbose=False)


def validate(yolo, save_dir: Path, name: str, plots: bool = False, **val_kwargs) -> dict:
    """One ``yolo.val`` run into ``save_dir/name``: headline metrics, fitness, latency (ms/image) and its folder."""
    metrics = yolo.val(project=str(save_dir), name=name, exist_ok=True, plots=plots, **val_kwargs)
    speed = metrics.speed
    return {
        **headline_metrics(metrics),
        "inference_ms": float(speed["inference"]),
        "total_ms": float(sum(speed.get(key, 0.0) for key in ("preprocess", "inference", "postprocess"))),
        "val_dir": str(metrics.save_dir),
    }


def best_k(rows: list[dict]) -> int:
    """The k with the highest fitness; ties go to the smaller k."""
    return max(rows, key=lambda r: (r["fitness"], -r["k"]))["k"]


def metric_names(rows: list[dict]) -> list[str]:
    """The headline metric names of sweep rows (e.g. ``["mAP50", "mAP50-95"]``)."""
    return [key for key in rows[0] if key not in ("k", "fitness", "inference_ms", "total_ms", "val_dir")]


def format_table(rows: list[dict]) -> str:
    """A Table 4a-style Markdown table of sweep rows, the best k marked."""
    names, best = metric_names(rows), best_k(rows)
    lines = [
        f"| k | {' | '.join(names)} | fitness | inference (ms/img) | pre+inf+post (ms/img) |",
        "|---" * (len(names) + 4) + "|",
    ]
    for r in rows:
        values = " | ".join(f"{r[n]:.4f}" for n in names)
        k = f"**{r['k']}** (best)" if r["k"] == best else str(r["k"])
        lines.append(f"| {k} | {values} | {r['fitness']:.4f} | {r['inference_ms']:.2f} | {r['total_ms']:.2f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path:
    """Headline metrics (left axis) and inference latency (right axis) against k, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), tight_layout=True)
    for name, marker in zip(metric_names(rows), "os"):
        ax.plot(ks, [r[name] for r in rows], marker=marker, label=name)
    ax.set_xlabel("top-k (0 = coarse attention only)")
    ax.set_ylabel("metric")
    ax.set_xticks(ks)
    latency = ax.twinx()
    latency.plot(ks, [r["inference_ms"] for r in rows], "k--^", label="inference ms/img")
    latency.set_ylabel("inference (ms/img)")
    handles = ax.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="best", fontsize=8)
    ax.axvline(best_k(rows), color="grey", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def yaml_with_topk(yaml: dict, k: int) -> dict:
    """A copy of a model YAML dict with every PST row's args set to ``[c2, mlp_ratio, e, k, ...]``."""
    from ..integration import PLUGIN_MODULES

    defaults = inspect.signature(PST).parameters
    yaml = copy.deepcopy(yaml)
    for row in yaml.get("backbone", []) + yaml.get("head", []):
        if row[2] in PLUGIN_MODULES:
            args = list(row[3])
            args += [defaults[name].default for name in ("mlp_ratio", "e", "k")][len(args) - 1 :]
            args[3] = k
            row[3] = args
    return yaml


def save_with_topk(src: str | Path, dst: str | Path, k: int, sweep_rows: list[dict] | None = None) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with top-k ``k`` as the default of its model (and EMA, if any).

    Sets ``topk`` on every PSA module and ``k`` in every PST row of the modules' ``yaml``; records ``k`` and the
    sweep under ``ckpt["pst_yolo"]``. ``src`` is not modified.
    """
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    modules = [ckpt.get(key) for key in ("model", "ema") if isinstance(ckpt, dict)]
    modules = [m for m in modules if isinstance(m, nn.Module)]
    if not modules or not any(count_psa(m) for m in modules):
        raise ValueError(f"{src}: not an Ultralytics checkpoint of a PST model (no PSA module in 'model' or 'ema').")
    for m in modules:
        set_topk(m, k)
        if isinstance(getattr(m, "yaml", None), dict):
            m.yaml = yaml_with_topk(m.yaml, k)
    ckpt["pst_yolo"] = {**(ckpt.get("pst_yolo") or {}), "topk": k, "topk_sweep": sweep_rows}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments -> options; keys other than ours go to ``yolo val`` (values as Ultralytics parses)."""
    from ultralytics.cfg import smart_value

    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(options) != len(argv) or "model" not in options:
        raise SystemExit(f"pst-yolo topk: bad arguments {argv}.\n{USAGE}")
    try:
        ks = [int(v) for v in options.pop("ks", ",".join(map(str, DEFAULT_KS))).strip("[]").split(",")]
    except ValueError as e:
        raise SystemExit(f"pst-yolo topk: ks must be comma-separated non-negative integers ({e}).") from None
    if not ks or min(ks) < 0 or len(set(ks)) != len(ks):
        raise SystemExit(f"pst-yolo topk: ks must be distinct non-negative integers, got {ks}.")
    save = options.pop("save", "False")
    if save.lower() in ("true", "false"):
        save = save.lower() == "true"
    elif save.isdigit():
        save = int(save)
    else:
        raise SystemExit(f"pst-yolo topk: save must be True, False or a top-k value, got '{save}'.")
    model = Path(options.pop("model"))
    if model.suffix != ".pt" or not model.is_file():
        raise SystemExit(f"pst-yolo topk: model must be a trained checkpoint file (.pt), got '{model}'.")
    return {
        "model": model,
        "ks": sorted(ks),
        "save": save,
        "project": Path(options.pop("project", "runs/pst-topk")),
        "name": options.pop("name", model.stem),
        "val_kwargs": {key: smart_value(value) for key, value in options.items()},
    }


def run(model: Path, ks: list[int], save: bool | int, project: Path, name: str, val_kwargs: dict) -> dict:
    """Sweep ``ks`` on ``model``; write the table, JSON, plot and (``save``) the checkpoint copy; return a summary."""
    from ultralytics import YOLO
    from ultralytics.utils.files import increment_path

    yolo = YOLO(str(model))
    if not count_psa(yolo.model):
        raise SystemExit(
            f"pst-yolo topk: {model} has no PSA (PST) module, so top-k does not apply; give a PST model "
            "(e.g. trained from yolo11n-pst.yaml)."
        )
    save_dir = increment_path(project / name, mkdir=True)
    plots = bool(val_kwargs.pop("plots", False))
    rows = sweep(yolo, ks, save_dir, plots=plots, **val_kwargs)
    best = best_k(rows)
    table = format_table(rows)
    (save_dir / "topk.md").write_text(table + "\n")
    plot = plot_sweep(rows, save_dir / "topk.png", f"{model} ({yolo.task})")
    summary = {"model": str(model), "task": yolo.task, "best_k": best, "rows": rows, "table": str(save_dir / "topk.md"),
               "plot": str(plot)}  # fmt: skip
    if save is not False:
        k = best if save is True else save
        summary["saved"] = str(save_with_topk(model, save_dir / f"{model.stem}-topk{k}.pt", k, rows))
        summary["saved_k"] = k
    (save_dir / "topk.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``pst-yolo topk model=best.pt [data=...] [ks=0,4,8,16,32] [save=True|K] [project=DIR] [name=NAME] ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    summary = run(**parse_args(args))
    print(f"\npst-yolo topk: {summary['model']} ({summary['task']})\n{Path(summary['table']).read_text()}")
    print(
        f"best k = {summary['best_k']} (highest fitness); table, topk.json and plot in {Path(summary['plot']).parent}"
    )
    if "saved" in summary:
        print(f"wrote {summary['saved']} with top-k {summary['saved_k']} as its default; use it with: "
              f"yolo val model={summary['saved']}")  # fmt: skip


if __name__ == "__main__":
    main()
