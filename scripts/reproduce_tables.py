"""Print the paper's Tables 1-3 (and 4a) with our numbers beside the paper's: sizes measured live, accuracy from runs.

    python scripts/reproduce_tables.py                                   # sizes only (builds every model: ~1-2 min CPU)
    python scripts/reproduce_tables.py --tables 2 4a \\
        --result yolo11n-pst=runs/coco/yolo11n-pst --result yolo11n=runs/coco/yolo11n

Every cell reads ``ours (paper)``. Sizes: parameters and GFLOPs of the fused model at 640 in the paper's convention
(convolutions + linear layers), measured by ``pst_yolo.tools.model_sizes`` from the shipped or stock YAML. Accuracy:
``--result MODEL=PATH`` where PATH is a JSON written by scripts/val_coco.py or scripts/val_imagenet.py, or a run
folder holding one (``coco_val.json`` / ``imagenet_val.json``), else its Ultralytics ``results.csv`` (best epoch;
Ultralytics' own mAP, not the COCO API, and no AP75). COCO rows use top-k 8 (the paper's setting) when evaluated.
Table 1 is on test-dev in the paper (an evaluation server); ours comes from val2017.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PAPER_TOPK = 8


@dataclass(frozen=True)
class Row:
    """One row of a paper table: our model name (None: a method we do not build) and the paper's values as printed."""

    key: str | None
    name: str
    gflops: str
    params: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A paper table: caption, metric column names (keys into our result dicts) and rows."""

    caption: str
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]


def r(key, name, gflops, params, *metrics) -> Row:
    """Shorthand for a Row."""
    return Row(key, name, gflops, params, metrics)


TABLES = {
    "1": Table(
        "Table 1: attention FPN detectors, COCO test-dev (ours: val2017), 640",
        ("AP", "AP50", "AP75"),
        (
            r(None, "R-50-Retina+SA", "97.4", "38.6", "38.0", "58.7", "40.5"),
            r(None, "R-50-AFPN", "136.4*", "46.9*", "38.4", "61.1", "41.9"),
            r(None, "R-50-A2-FPN-Lite", "120.4*", "44.5*", "39.8", "62.3", "43.4"),
            r(None, "R-50-AC-FPN", "135.9*", "44.7*", "40.4", "63.0", "44.0"),
            r(None, "Generalized-FPN-D7", "79.5", "4.54*", "45.8", "-", "-"),
            r("r18-pst", "R-18-PST-N", "42.5", "16.4", "46.3", "63.7", "49.6"),
            r("r50-pst", "R-50-PST-N", "71.9", "26.0", "47.9", "65.3", "51.8"),
            r(None, "R-101-Retina+SA", "129.44", "58.5", "40.0", "60.0", "42.9"),
            r(None, "R-101-AFPN", "203.2*", "64.7*", "40.2", "62.5", "43.6"),
            r(None, "R-101-A2-FPN", "209.0*", "62.5*", "42.8", "65.2", "47.0"),
            r(None, "R-101-AC-FPN", "202.7*", "62.5*", "42.4", "65.1", "46.2"),
            r(None, "Generalized-FPN-D11", "113.3", "7.2*", "46.9", "-", "-"),
            r("r101-pst", "R-101-PST-S", "138.5", "49.9", "50.9", "68.1", "55.7"),
        ),
    ),
    "2": Table(
        "Table 2: real-time detectors, COCO val2017, 640",
        ("AP", "AP50", "AP75"),
        (
            r(None, "YOLOv6-3.0-N", "11.4", "4.7", "37.0", "52.7", "-"),
            r("yolov8n", "YOLOv8-N", "8.7", "3.2", "37.4", "52.6", "40.5"),
            r("yolov10n", "YOLOv10-N", "6.7", "2.3", "38.5", "53.8", "41.7"),
            r(None, "EfficientDet-D1", "6.1", "6.6", "39.1", "-", "-"),
            r("yolo11n", "YOLOv11-N", "6.5", "2.6", "39.4", "55.3", "42.8"),
            r("yolo11n-pst", "YOLOv11-PST-N", "10.1", "2.8", "40.3", "56.0", "43.3"),
            r("yolo12n", "YOLOv12-N", "6.5", "2.6", "40.6", "56.7", "43.8"),
            r("yolo12n-pst", "YOLOv12-PST-N", "15.8", "4.3", "42.6", "59.8", "46.1"),
            r(None, "YOLOv6-3.0-S", "45.3", "18.5", "44.3", "61.2", "-"),
            r("yolov8s", "YOLOv8-S", "28.6", "11.2", "45.0", "61.8", "48.7"),
            r(None, "RT-DETR-R18", "60.0", "20.0", "46.5", "63.8", "-"),
            r("yolov10s", "YOLOv10-S", "21.6", "7.2", "46.3", "63.0", "50.4"),
            r("yolo11s", "YOLOv11-S", "21.5", "9.4", "46.9", "63.9", "50.6"),
            r("yolo11s-pst", "YOLOv11-PST-S", "21.0", "9.3", "47.4", "64.5", "51.3"),
            r(None, "YOLOv6-3.0-M", "85.8", "34.9", "49.1", "66.1", "-"),
            r("yolov8m", "YOLOv8-M", "78.9", "25.9", "50.3", "67.2", "54.7"),
            r(None, "RT-DETR-R34", "100.0", "36.0", "48.9", "66.8", "-"),
            r(None, "RT-DETRv2-R34", "100.0", "36.0", "49.9", "67.5", "-"),
            r("yolov10m", "YOLOv10-M", "59.1", "15.4", "51.1", "68.1", "55.8"),
            r("yolo11m", "YOLOv11-M", "68.0", "20.1", "51.5", "68.5", "55.7"),
            r("yolo11m-pst", "YOLOv11-PST-M", "65.9", "19.5", "52.1", "69.5", "56.7"),
        ),
    ),
    "3": Table(
        "Table 3: ImageNet classifiers (caption: 224; GFLOPs match 640, see MODEL_ZOO.md)",
        ("top1", "top5"),
        (
            r("yolov8n-cls", "YOLOv8-cls-N", "4.9", "2.7", "69.0", "88.3"),
            r("yolo11n-cls", "YOLOv11-cls-N", "5.3", "1.6", "70.0", "89.4"),
            r("yolo11n-cls-pst", "YOLOv11-cls-PST-N", "4.9", "3.5", "70.9", "89.6"),
            r(None, "EfficientNet-B0", "3.9", "5.3", "77.1", "93.3"),
            r(None, "R-18", "42", "17.9", "68.5", "-"),
            r("r18-cls-pst", "R-18-PST-N", "43", "19.6", "75.0", "92.5"),
            r(None, "PVTv2-b1", "21", "13.1", "78.7", "-"),
            r("yolov8s-cls", "YOLOv8-cls-S", "17", "6.4", "73.8", "91.7"),
            r("yolo11s-cls", "YOLOv11-cls-S", "16", "5.5", "75.4", "92.7"),
            r("yolo11s-cls-pst", "YOLOv11-cls-PST-S", "19", "11.5", "76.2", "93.0"),
            r(None, "R-50", "71", "27.4", "76.2", "-"),
            r("r50-cls-pst", "R-50-PST-N", "72", "29.2", "77.9", "94.0"),
            r(None, "Swin-T", "45", "28.3", "81.2", "-"),
            r(None, "PVTv2-b2", "40", "25.4", "82.0", "-"),
            r(None, "R-101", "132", "46.4", "77.4", "-"),
            r("r101-cls-pst", "R-101-PST-S", "140", "54.4", "78.4", "94.1"),
            r(None, "ViT-B", "176", "86.6", "77.9", "-"),
            r(None, "Swin-S", "87", "49.6", "83.1", "-"),
            r(None, "Swin-B", "154", "87.8", "83.4", "-"),
        ),
    ),
}
TABLE_4A = {0: "40.2", 8: "40.3", 16: "39.5", 32: "38.9"}  # YOLOv11-PST-N AP(val) per top-k
TABLE_4A_MODEL = "yolo11n-pst"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", default=["1", "2", "3", "4a"], choices=["1", "2", "3", "4a"])
    p.add_argument("--result", action="append", default=[], metavar="MODEL=PATH", help="accuracy source of a model")
    p.add_argument("--no-measure", action="store_true", help="skip building the models (paper sizes only)")
    return p.parse_args(argv)


def parse_results(pairs: list[str]) -> dict[str, Path]:
    """``["yolo11n-pst=runs/coco/yolo11n-pst"]`` -> {model: path}; exits when a path does not exist."""
    results = {}
    for pair in pairs:
        key, sep, path = pair.partition("=")
        if not sep or not Path(path).exists():
            raise SystemExit(
                f"--result {pair!r}: expected MODEL=PATH with an existing PATH (a val JSON or run folder)."
            )
        results[key.removesuffix(".yaml")] = Path(path)
    return results


def metrics_from_val_json(path: Path) -> dict[str, float]:
    """Percent metrics from a val_coco.py / val_imagenet.py JSON: the top-k 8 row, else the only or last row."""
    rows = json.loads(path.read_text())["rows"]
    row = next((x for x in rows if x["topk"] == PAPER_TOPK), rows[-1])
    return {k: 100 * v for k, v in row.items() if k in ("AP", "AP50", "AP75", "top1", "top5")}


def metrics_from_results_csv(path: Path) -> dict[str, float]:
    """Percent metrics of the best epoch in an Ultralytics results.csv (detection: by mAP50-95; classify: top-1)."""
    with open(path, newline="") as f:
        epochs = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if "metrics/mAP50-95(B)" in epochs[0]:
        best = max(epochs, key=lambda e: e["metrics/mAP50-95(B)"])
        return {"AP": 100 * best["metrics/mAP50-95(B)"], "AP50": 100 * best["metrics/mAP50(B)"]}
    best = max(epochs, key=lambda e: e["metrics/accuracy_top1"])
    return {"top1": 100 * best["metrics/accuracy_top1"], "top5": 100 * best["metrics/accuracy_top5"]}


def load_metrics(path: Path) -> dict[str, float]:
    """Percent metrics from a val JSON, or a run folder holding one, or its results.csv."""
    if path.is_file():
        return metrics_from_val_json(path) if path.suffix == ".json" else metrics_from_results_csv(path)
    for name in ("coco_val.json", "imagenet_val.json"):
        if (path / name).is_file():
            return metrics_from_val_json(path / name)
    if (path / "results.csv").is_file():
        return metrics_from_results_csv(path / "results.csv")
    raise SystemExit(f"{path}: no coco_val.json, imagenet_val.json or results.csv in it.")


def measure_sizes(key: str) -> tuple[float, float] | str:
    """(params M, paper-convention GFLOPs at 640) of a shipped or stock model name, or why it could not be built."""
    from ultralytics.nn.tasks import guess_model_scale

    from pst_yolo.configs import find_model_config
    from pst_yolo.tools.model_sizes import config_scales, measure

    config = find_model_config(f"{key}.yaml")
    if config is None:
        config, scale = f"{key}.yaml", guess_model_scale(f"{key}.yaml")
    else:
        scales = config_scales(config)
        scale = scales[0] if len(scales) == 1 else guess_model_scale(f"{key}.yaml")
    try:
        size = measure(config, scale, key)
    except Exception as e:  # a config another release ships, or a stock YAML this Ultralytics lacks
        return f"{key}: {type(e).__name__}: {e}"
    return size.params_m, size.gflops


def cell(ours: float | None, paper: str, digits: int = 1) -> str:
    """``ours (paper)``, or ``- (paper)`` when we have no number."""
    return f"{'-' if ours is None else f'{ours:.{digits}f}'} ({paper})"


def format_table(table: Table, sizes: dict, results: dict[str, dict]) -> str:
    """One paper table as Markdown with our values beside the paper's."""
    header = ["method", "GFLOPs", "params M", *table.metrics]
    lines = [f"\n{table.caption}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        measured = sizes.get(row.key)
        params, gflops = measured if isinstance(measured, tuple) else (None, None)
        scores = results.get(row.key, {})
        cells = [cell(gflops, row.gflops, 2), cell(params, row.params, 2)]
        cells += [cell(scores.get(m), paper) for m, paper in zip(table.metrics, row.metrics)]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table_4a(path: Path | None) -> str:
    """Table 4a (top-k sweep of YOLOv11-PST-N) from a val_coco.py JSON, paper values beside."""
    found = {}
    if path is not None:
        json_path = path if path.is_file() else path / "coco_val.json"
        if json_path.is_file():
            found = {row["topk"]: 100 * row["AP"] for row in json.loads(json_path.read_text())["rows"]}
    lines = ["\nTable 4a: top-k of YOLOv11-PST-N, COCO val2017 AP (fine attention at inference only)\n",
             "| top-k | AP |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {cell(found.get(k), paper)} |" for k, paper in TABLE_4A.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure sizes, read accuracies, print the requested tables."""
    args = parse_args(argv)
    paths = parse_results(args.result)
    results = {key: load_metrics(path) for key, path in paths.items()}
    keys = [row.key for t in args.tables if t in TABLES for row in TABLES[t].rows if row.key]
    sizes = {} if args.no_measure else {key: measure_sizes(key) for key in dict.fromkeys(keys)}
    for t in args.tables:
        print(format_table_4a(paths.get(TABLE_4A_MODEL)) if t == "4a" else format_table(TABLES[t], sizes, results))
    failures = [v for v in sizes.values() if isinstance(v, str)]
    if failures:
        print("\nnot measured:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main(sys.argv[1:])
