"""Choose the PSA top-k on your own data: validate a trained PST model at several k (paper Table 4a) in one load,
and keep the cheapest k unless a larger one is ahead beyond the noise.

    pst-yolo topk model=best.pt [data=data.yaml] [ks=0,4,8,16,32] [save=True|K] [bootstrap=1000] [seed=0]
                  [latency_rounds=20] [project=runs/pst-topk] [name=NAME] [plots=False]
                  [any other `yolo val` key, e.g. imgsz=640 batch=16 device=0 split=val]

Each k is validated by the task's own Ultralytics validator (``model.val``), so detection, segmentation, pose, OBB and
classification models all work; ``data`` and ``imgsz`` default to the ones the model was trained with. The metric is
Ultralytics' fitness (its ``best.pt`` criterion: mAP50-95 for detection and OBB, box + mask or box + pose mAP50-95
for segmentation and pose, the mean of top-1 and top-5 for classification). Its uncertainty comes from the same
validation: a paired bootstrap over the validation images (``bootstrap`` resamples, default 1000, each k rescored on
the same resampled images from the per-image statistics its validator keeps; costs ``bootstrap * len(ks)`` metric
evaluations, so a smaller count suits a large set; fixed ``seed``: same checkpoint and data, same answer) gives a 95%
interval of each k's metric and of its difference to the cheapest and to the best k. The choice is the cheapest k
whose difference to the best k reaches 0; the tool says why in words, and when the validation set is too small to
separate any k from another, about how many images would. Where a task's validator keeps no per-image statistics,
it warns and chooses the highest fitness. Latency is measured apart from validation: the fused model at the
deployment size (``imgsz``), batch 1, ``latency_rounds`` rounds interleaved over k, reported as median and
interquartile range with the machine; a difference inside that spread is not ranked (``≈ k=0``) and latency does not
enter the choice. Writes ``topk.md``, ``topk.json`` and ``topk.png`` (metrics with their intervals and latency with
its spread against k) to ``project/name``. ``save=True`` writes a copy of the checkpoint with the chosen k
(``save=K``: with k = K) on every PSA module of its model and EMA and in its YAML rows, so stock
``yolo val/predict/export`` use it by default and ``yolo train model=copy.pt`` keeps it. The original checkpoint is
never modified.
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
from .topk_evidence import Evidence, PerImageRecorder, fallback_text, headline_metrics, metric_label, weigh

USAGE = __doc__.split("\n\n")[1]
DEFAULT_KS = (0, 4, 8, 16, 32)


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


def choose(
    rows: list[dict], recorder: PerImageRecorder, task: str, resamples: int = 1000, seed: int = 0
) -> tuple[int, Evidence | None, str]:
    """The k to keep, from the per-image statistics that ``recorder`` captured during the sweep of ``rows``.

    Args:
        rows: Sweep rows, one per validation run of ``recorder`` and in its order.
        recorder: The per-image statistics of each run.
        task: The model's task, for the metric's name and the warnings.
        resamples, seed: Of the paired bootstrap (:func:`~pst_yolo.tools.topk_evidence.weigh`).

    Returns:
        The chosen k, the evidence (``None`` where the validator keeps no per-image statistics: then the k with the
        highest fitness, with a warning) and the decision text.
    """
    from ultralytics.utils import LOGGER

    if recorder.unsupported:
        text = fallback_text(task, recorder.unsupported, best_k(rows))
        LOGGER.warning(text)
        return best_k(rows), None, text
    if len(recorder.runs) != len(rows):
        raise RuntimeError(f"pst-yolo topk: {len(recorder.runs)} validation runs recorded for {len(rows)} k.")
    runs = dict(zip((r["k"] for r in rows), recorder.runs))
    images = len(recorder.runs[0])
    LOGGER.info(f"pst-yolo topk: paired bootstrap, {resamples} resamples of {images} images x {len(rows)} k")
    evidence = weigh(runs, metric_label(task), resamples, seed)
    for r in rows:
        if abs(evidence.point[r["k"]]["fitness"] - r["fitness"]) > 1e-6:  # float32 pixel counts round above 2**24
            raise RuntimeError(f"pst-yolo topk: k={r['k']}: the per-image statistics score fitness "
                               f"{evidence.point[r['k']]['fitness']}, the validator {r['fitness']}.")  # fmt: skip
        r.update(evidence.row_fields(r["k"]))
    return evidence.chosen, evidence, evidence.text


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
    counts = {}
    for key, default, minimum in (("bootstrap", 1000, 50), ("seed", 0, 0), ("latency_rounds", 20, 3)):
        value = options.pop(key, str(default))
        if not value.isdigit() or int(value) < minimum:
            raise SystemExit(f"pst-yolo topk: {key} must be an integer >= {minimum}, got '{value}'.")
        counts[key] = int(value)
    model = Path(options.pop("model"))
    if model.suffix != ".pt" or not model.is_file():
        raise SystemExit(f"pst-yolo topk: model must be a trained checkpoint file (.pt), got '{model}'.")
    return {
        "model": model,
        "ks": sorted(ks),
        "save": save,
        **counts,
        "project": Path(options.pop("project", "runs/pst-topk")),
        "name": options.pop("name", model.stem),
        "val_kwargs": {key: smart_value(value) for key, value in options.items()},
    }


def run(
    model: Path,
    ks: list[int],
    save: bool | int,
    project: Path,
    name: str,
    val_kwargs: dict,
    bootstrap: int = 1000,
    seed: int = 0,
    latency_rounds: int = 20,
) -> dict:
    """Sweep ``ks`` on ``model``, weigh the evidence, time each k; write the table, JSON, plot and (``save``) the
    checkpoint copy; return a summary."""
    from ultralytics import YOLO
    from ultralytics.utils.files import increment_path
    from ultralytics.utils.torch_utils import select_device

    from .topk_latency import machine_label, measure_latency
    from .topk_report import format_table, intervals_note, plot_sweep

    yolo = YOLO(str(model))
    if not count_psa(yolo.model):
        raise SystemExit(
            f"pst-yolo topk: {model} has no PSA (PST) module, so top-k does not apply; give a PST model "
            "(e.g. trained from yolo11n-pst.yaml)."
        )
    save_dir = increment_path(project / name, mkdir=True)
    plots = bool(val_kwargs.pop("plots", False))
    recorder = PerImageRecorder().attach(yolo)
    try:
        rows = sweep(yolo, ks, save_dir, plots=plots, **val_kwargs)
    finally:
        recorder.detach(yolo)
    chosen, evidence, decision = choose(rows, recorder, yolo.task, bootstrap, seed)

    imgsz = val_kwargs.get("imgsz") or yolo.overrides.get("imgsz") or 640
    device = select_device(val_kwargs.get("device") or "", verbose=False)
    latency = measure_latency(yolo.model, ks, imgsz, device, rounds=latency_rounds)
    machine = machine_label(device)
    for r in rows:
        r["latency"] = latency[r["k"]].to_json()
    table = format_table(rows, chosen, evidence, latency)
    latency_title = f"latency at {imgsz} px, batch 1, fp32, {latency_rounds} rounds: {machine}"
    note = f"{intervals_note(evidence)}\n\n" if evidence else ""
    (save_dir / "topk.md").write_text(f"{table}\n\n{latency_title}\n\n{note}{decision}\n")
    title = f"{Path(*model.parts[-4:])} ({yolo.task})"
    plot = plot_sweep(rows, chosen, evidence, latency, save_dir / "topk.png", title, latency_title)
    summary = {"model": str(model), "task": yolo.task, "best_k": best_k(rows), "chosen_k": chosen,
               "decision": evidence.to_json() if evidence else {"chosen_k": chosen, "text": decision},
               "latency": {"imgsz": imgsz, "batch": 1, "dtype": "fp32", "rounds": latency_rounds, "machine": machine,
                           "device": str(device)},
               "rows": rows, "table": str(save_dir / "topk.md"), "plot": str(plot)}  # fmt: skip
    if save is not False:
        k = chosen if save is True else save
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
    print(f"k = {summary['chosen_k']} chosen; table, topk.json and plot in {Path(summary['plot']).parent}")
    if "saved" in summary:
        print(f"wrote {summary['saved']} with top-k {summary['saved_k']} as its default; use it with: "
              f"yolo val model={summary['saved']}")  # fmt: skip


if __name__ == "__main__":
    main()
