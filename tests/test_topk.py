"""``pst-yolo topk``: metrics per task, the top-k rewrite of YAML and checkpoint, the tool end to end with stock yolo"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import pytest
import torch
from test_classification import calibrate_batchnorm
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils.metrics import ClassifyMetrics, DetMetrics, OBBMetrics, PoseMetrics, SegmentMetrics

from pst_yolo.nn import PSAttn
from pst_yolo.tools import topk
from pst_yolo.tools.datasets import build_digits_detection

BIN = Path(sys.executable).parent
IMGSZ = 64


def psa_topks(model: torch.nn.Module) -> set[int]:
    return {m.topk for m in model.modules() if isinstance(m, PSAttn)}


@pytest.mark.parametrize(
    ("metrics", "names"),
    [
        (DetMetrics(), ["mAP50", "mAP50-95"]),
        (OBBMetrics(), ["mAP50", "mAP50-95"]),
        (SegmentMetrics(), ["mAP50", "mAP50-95"]),
        (PoseMetrics(), ["mAP50", "mAP50-95"]),
        (ClassifyMetrics(), ["accuracy_top1", "accuracy_top5"]),
    ],
)
def test_headline_metrics_per_task(metrics, names):
    assert list(topk.headline_metrics(metrics)) == [*names, "fitness"]


def test_headline_metrics_pick_the_task_group():
    """Segmentation reports mask mAP (not box), classification its top-1/top-5 accuracy."""
    seg = SegmentMetrics()
    seg.box.all_ap = torch.full((1, 10), 0.2).numpy()
    seg.seg.all_ap = torch.full((1, 10), 0.7).numpy()
    seg.box.ap_class_index = seg.seg.ap_class_index = [0]
    assert topk.headline_metrics(seg)["mAP50-95"] == pytest.approx(0.7)
    cls = ClassifyMetrics()
    cls.top1, cls.top5 = 0.25, 0.75
    assert topk.headline_metrics(cls) == {"accuracy_top1": 0.25, "accuracy_top5": 0.75, "fitness": 0.5}


def test_best_k_prefers_fitness_then_the_smaller_k():
    rows = [{"k": 0, "fitness": 0.3}, {"k": 8, "fitness": 0.4}, {"k": 16, "fitness": 0.4}, {"k": 32, "fitness": 0.1}]
    assert topk.best_k(rows) == 8


@pytest.mark.parametrize("name", ["yolo11n-pst.yaml", "yolo12n-pst.yaml"])  # PST and PSTFixedWidth rows
def test_yaml_with_topk_rebuilds_with_the_new_k(name):
    yaml = yaml_model_load(name)
    new = topk.yaml_with_topk(yaml, 3)
    rows = [(old, row) for old, row in zip(yaml["backbone"] + yaml["head"], new["backbone"] + new["head"])]
    pst_rows = [row for old, row in rows if row[2].startswith("PST")]
    assert len(pst_rows) == 2 and all(row[3] == [*old[3], 3] for old, row in rows if row[2].startswith("PST"))
    assert all(old == row for old, row in rows if not row[2].startswith("PST"))
    assert topk.yaml_with_topk(new, 5)["head"][2][3][3] == 5  # an existing k is replaced, not appended
    assert psa_topks(DetectionModel(yaml, verbose=False)) == {8}
    assert psa_topks(DetectionModel(new, verbose=False)) == {3}


def test_save_with_topk_sets_model_ema_and_yaml(tmp_path):
    """A mid-training checkpoint holds the model and its EMA: both get the new k, in modules and YAML; src unchanged."""
    yaml = yaml_model_load("yolo11n-pst.yaml")
    src = tmp_path / "last.pt"
    model = DetectionModel(yaml, verbose=False)
    torch.save({"model": model, "ema": copy.deepcopy(model)}, src)
    ckpt = torch.load(topk.save_with_topk(src, tmp_path / "copy.pt", 16), map_location="cpu", weights_only=False)
    assert ckpt["model"] is not ckpt["ema"]
    assert psa_topks(ckpt["model"]) == psa_topks(ckpt["ema"]) == {16}
    assert ckpt["model"].yaml == ckpt["ema"].yaml == topk.yaml_with_topk(yaml, 16)
    assert ckpt["pst_yolo"]["topk"] == 16
    assert psa_topks(torch.load(src, map_location="cpu", weights_only=False)["ema"]) == {8}


def test_bad_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="model must be a trained checkpoint"):
        topk.main(["model=missing.pt"])
    with pytest.raises(SystemExit, match="ks must be"):
        topk.main(["model=x.pt", "ks=0,a"])
    with pytest.raises(SystemExit, match="save must be"):
        topk.main(["model=x.pt", "save=maybe"])
    with pytest.raises(SystemExit, match="bootstrap must be an integer >= 50"):
        topk.main(["model=x.pt", "bootstrap=10"])


def test_stock_model_is_refused(tmp_path):
    from ultralytics import YOLO

    stock = tmp_path / "yolo12n.pt"
    YOLO("yolo12n.yaml").save(stock)
    with pytest.raises(SystemExit, match="has no PSA"):
        topk.main([f"model={stock}", "data=unused.yaml"])
    with pytest.raises(ValueError, match="not an Ultralytics checkpoint of a PST model"):
        topk.save_with_topk(stock, tmp_path / "copy.pt", 4)


def run(exe: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "YOLO_VERBOSE": "true"}
    result = subprocess.run(
        [str(BIN / exe), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{exe} {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A YOLO11n-PST trained 1 epoch by the stock ``yolo train`` on 16 digit images at 64 px, then its BatchNorm
    statistics calibrated on the val images (one epoch leaves them at their init, which hides the fine attention)."""
    root = tmp_path_factory.mktemp("topk")
    data = build_digits_detection(root / "data", train_images=16, val_images=6, imgsz=IMGSZ, seed=5)
    run("yolo", "train", "model=yolo11n-pst.yaml", f"data={data}", "epochs=1", f"imgsz={IMGSZ}", "batch=8",
        "workers=0", "device=cpu", f"project={root}", "name=train", "plots=False", cwd=root)  # fmt: skip
    ckpt = torch.load(root / "train" / "weights" / "best.pt", map_location="cpu", weights_only=False)
    images = [cv2.imread(str(p))[..., ::-1] for p in sorted((root / "data" / "images" / "val").glob("*.png"))]
    batch = torch.cat([torch.from_numpy(cv2.resize(i, (IMGSZ, IMGSZ)).copy())[None].float() for i in images])
    model = ckpt["model"].float()
    calibrate_batchnorm(model, batch.permute(0, 3, 1, 2) / 255)
    ckpt["model"] = model.half()
    weights = root / "calibrated.pt"
    torch.save(ckpt, weights)
    return weights, data


def predictions(val_dir: Path) -> list[dict]:
    return json.loads((Path(val_dir) / "predictions.json").read_text())


@pytest.mark.slow
def test_topk_end_to_end_with_stock_yolo_val(trained, tmp_path):
    """Table with intervals, plot and a copy whose default k is the chosen one; stock ``yolo val`` of the copy predicts
    as the tool did at that k (identical predictions.json), which differs from the other k's predictions."""
    weights, data = trained
    common = [f"data={data}", f"imgsz={IMGSZ}", "batch=6", "device=cpu", "workers=0", "conf=0", "save_json=True"]
    out = run("pst-yolo", "topk", f"model={weights}", "ks=0,4", "save=True", f"project={tmp_path}", "name=sweep",
              "bootstrap=100", "latency_rounds=3", *common, cwd=tmp_path)  # fmt: skip
    assert "| k | mAP50 [95% interval] | mAP50-95 [95% interval] | Δ mAP50-95 vs k=0 |" in out
    summary = json.loads((tmp_path / "sweep" / "topk.json").read_text())
    assert [r["k"] for r in summary["rows"]] == [0, 4] and summary["saved_k"] == summary["chosen_k"]
    assert summary["decision"]["text"] in out and summary["decision"]["images"] == 6
    assert all(len(r["intervals"]["mAP50-95"]) == 2 and r["latency"]["median"] > 0 for r in summary["rows"])
    table = (tmp_path / "sweep" / "topk.md").read_text().split("\n\n")
    assert len(table[0].splitlines()) == 4 and table[1].startswith(f"latency at {IMGSZ} px")  # header, rule, k=0, k=4
    plot = cv2.imread(summary["plot"])
    assert plot is not None and plot.shape[0] > 300 and plot.shape[1] > 500
    by_k = {r["k"]: r for r in summary["rows"]}
    other = 4 if summary["saved_k"] == 0 else 0
    assert predictions(by_k[0]["val_dir"]) != predictions(by_k[4]["val_dir"]), "the fine attention changed nothing"

    saved = Path(summary["saved"])
    check = textwrap.dedent("""
        import sys
        from ultralytics import YOLO  # stock API: the plugin comes in through its start-up hook
        model = YOLO(sys.argv[1]).model
        rebuilt = type(model)(model.yaml, verbose=False)
        print(sorted({m.topk for m in model.modules() if type(m).__name__ == "PSAttn"}),
              sorted({m.topk for m in rebuilt.modules() if type(m).__name__ == "PSAttn"}))
    """)  # fmt: skip
    topks = run("python", "-c", check, str(saved), cwd=tmp_path).strip().splitlines()[-1]
    assert topks == f"[{summary['saved_k']}] [{summary['saved_k']}]"
    assert psa_topks(torch.load(weights, map_location="cpu", weights_only=False)["model"]) == {8}  # original untouched

    run("yolo", "val", f"model={saved}", f"project={tmp_path}", "name=stock", *common, cwd=tmp_path)
    stock = predictions(tmp_path / "stock")
    assert stock == predictions(by_k[summary["saved_k"]]["val_dir"])
    assert stock != predictions(by_k[other]["val_dir"])


def test_accuracy_script_tables(tmp_path):
    """scripts/accuracy.py's tables: mean ± sample std over seeds, per-seed differences, and the sweep against k=0."""
    spec = importlib.util.spec_from_file_location("accuracy", Path(__file__).parents[1] / "scripts" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    args = accuracy.parse_args(["--models", "yolo12n.yaml", "yolo11n-pst.yaml", "--ks", "0", "8"])

    def result(seed, model, maps):  # maps: {k: mAP50-95}
        rows = [{"k": k, "mAP50": 2 * m, "mAP50-95": m, "inference_ms": 10.0} for k, m in maps.items()]
        return {"seed": seed, "model": model, "train_s": 100.0, "rows": rows}

    results = [
        result(1, "yolo12n", {None: 0.10}), result(1, "yolo11n-pst", {0: 0.12, 8: 0.11}),
        result(2, "yolo12n", {None: 0.20}), result(2, "yolo11n-pst", {0: 0.16, 8: 0.18}),
    ]  # fmt: skip
    lines = accuracy.tables(results, args).splitlines()
    assert "| yolo12n | - | 30.0 ± 14.1 | 15.0 ± 7.1 | 10.0 / 20.0 | - | 100 |" in lines
    assert "| yolo11n-pst | 0 | 28.0 ± 5.7 | 14.0 ± 2.8 | 12.0 / 16.0 | -1.0 ± 4.2, 1/2 > 0 | 100 |" in lines
    assert "| yolo11n-pst | 8 | 29.0 ± 9.9 | 14.5 ± 4.9 | 0.5 ± 2.1 (1/2 > 0) | 10.0 |" in lines
    assert accuracy.plot_sweeps(results, tmp_path / "a.png").stat().st_size > 10_000
