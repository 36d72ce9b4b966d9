"""The reproduction scripts: --help without a GPU, and clear errors for a missing data set or too few GPUs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TRAIN_VAL = ("train_coco.py", "val_coco.py", "train_imagenet.py", "val_imagenet.py")


def run_script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run scripts/<name> offline with a private Ultralytics config dir."""
    env = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], check=False, capture_output=True, text=True,
                          env=env, timeout=180, cwd=tmp_path)  # fmt: skip


def make_coco(root: Path) -> Path:
    """A minimal folder in Ultralytics' COCO layout (one empty-label image per split, no real data)."""
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        (root / "images" / split / "000000000001.jpg").write_bytes(b"")
        (root / f"{split}.txt").write_text(f"./images/{split}/000000000001.jpg\n")
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    return root


def make_imagenet(root: Path) -> Path:
    """A minimal folder in Ultralytics' classification layout (two classes)."""
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            (root / split / cls).mkdir(parents=True)
    return root


@pytest.mark.parametrize("name", [*TRAIN_VAL, "reproduce_tables.py", "cpe_layout.py"])
def test_help(name, tmp_path):
    result = run_script(name, "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("train_coco.py", ["--coco", "nowhere"], "COCO data set incomplete"),
        ("val_coco.py", ["--coco", "nowhere", "--weights", "{weights}"], "COCO val2017 incomplete"),
        ("train_imagenet.py", ["--imagenet", "nowhere"], "ImageNet data set incomplete"),
        ("val_imagenet.py", ["--imagenet", "nowhere", "--weights", "{weights}"], "ImageNet data set incomplete"),
    ],
)
def test_missing_dataset(name, args, expected, tmp_path):
    weights = tmp_path / "best.pt"
    weights.write_bytes(b"")
    result = run_script(name, *(a.format(weights=weights) for a in args), tmp_path=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr and "nowhere" in result.stderr


def test_coco_partial_layout_names_missing_files(tmp_path):
    coco = make_coco(tmp_path / "coco")
    (coco / "annotations" / "instances_val2017.json").unlink()
    result = run_script("val_coco.py", "--coco", str(coco), "--weights", str(coco / "x.pt"), tmp_path=tmp_path)
    assert result.returncode != 0 and "Weights not found" in result.stderr
    (coco / "x.pt").write_bytes(b"")
    result = run_script("val_coco.py", "--coco", str(coco), "--weights", str(coco / "x.pt"), tmp_path=tmp_path)
    assert result.returncode != 0 and "instances_val2017.json" in result.stderr


@pytest.mark.parametrize(
    ("name", "dataset_arg", "make"),
    [("train_coco.py", "--coco", make_coco), ("train_imagenet.py", "--imagenet", make_imagenet)],
)
def test_too_few_gpus(name, dataset_arg, make, tmp_path):
    import torch

    requested = torch.cuda.device_count() + 1  # always one more than this machine has
    devices = ",".join(str(i) for i in range(requested))
    root = make(tmp_path / "coco-or-imagenet")
    result = run_script(name, dataset_arg, str(root), "--devices", devices, tmp_path=tmp_path)
    assert result.returncode != 0
    assert f"asks for {requested} GPU(s)" in result.stderr and "device_count()" in result.stderr


def test_reproduce_tables_bad_result_path(tmp_path):
    result = run_script("reproduce_tables.py", "--no-measure", "--result", "yolo11n-pst=nowhere", tmp_path=tmp_path)
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_reproduce_tables_reads_val_json(tmp_path):
    """Paper values always print; a val_coco.py-style JSON fills our AP columns (top-k 8 row) and Table 4a."""
    rows = [{"topk": 0, "AP": 0.401, "AP50": 0.55, "AP75": 0.43}, {"topk": 8, "AP": 0.402, "AP50": 0.56, "AP75": 0.44}]
    (tmp_path / "coco_val.json").write_text(json.dumps({"rows": rows}))
    result = run_script("reproduce_tables.py", "--no-measure", "--tables", "2", "4a",
                        "--result", f"yolo11n-pst={tmp_path}", tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| YOLOv11-PST-N | - (10.1) | - (2.8) | 40.2 (40.3) | 56.0 (56.0) | 44.0 (43.3) |" in result.stdout
    assert "| 0 | 40.1 (40.2) |" in result.stdout and "| 16 | - (39.5) |" in result.stdout


def test_coco_api_stats_on_known_boxes(tmp_path):
    """One exact box and one at IoU 0.82: AP50 = AP75 = 1, AP = (1 + 0.7) / 2 (IoU 0.85-0.95 miss the second)."""
    if not any(importlib.util.find_spec(m) for m in ("faster_coco_eval", "pycocotools")):
        pytest.skip("needs faster-coco-eval or pycocotools")
    sys.path.insert(0, str(SCRIPTS))
    from val_coco import coco_api_stats

    image = {"width": 100, "height": 100}
    ground_truth = {
        "images": [{"id": 1, **image}, {"id": 2, **image}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    predictions = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [52, 50, 20, 20], "score": 0.8},  # IoU 360 / 440 = 0.82
    ]
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    stats = coco_api_stats(tmp_path / "gt.json", tmp_path / "pred.json", [1, 2])
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(1.0)
    assert stats["AP"] == pytest.approx(0.85)


def test_profile_train_step_charges_backward_to_layers(tmp_path):
    """The per-layer training profile: every PST layer gets forward and backward time, and only PST runs SDPA."""
    out = tmp_path / "profile.md"
    args = ("--batch", "2", "--imgsz", "64", "--iterations", "1", "--ops", "40", "--markdown", str(out))
    result = run_script("profile_train_step.py", *args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()}
    for layer in ("11", "14"):  # the two head layers where YOLO11n-PST has a PST and YOLO12n an A2C2f
        _, stock, _, _, pst, pst_fwd, pst_bwd, _ = rows[layer]
        assert (stock, pst) == ("A2C2f", "PST")
        assert float(pst_fwd) > 0 and float(pst_bwd) > 0
    backward = rows["`aten::_scaled_dot_product_flash_attention_for_cpu_backward`"]
    assert float(backward[1]) == 0 and float(backward[2]) > 0


def test_onnx_thread_pools_times_every_setup(tmp_path):
    """Smoke run of scripts/onnx_thread_pools.py: the three graphs under each setup, each setup in a fresh process."""
    pytest.importorskip("onnxruntime")
    result = run_script(
        "onnx_thread_pools.py", "--imgsz", "64", "--processes", "1", "--rounds", "1", "--warmup", "0", "--threads", "1",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| own", "| shared", "| alone"))]
    assert len(rows) == 3, result.stdout
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[2:5]), rows


def test_round_ratios_prints_both_estimators(tmp_path):
    """Smoke run of scripts/round_ratios.py: both estimators of both ratios for every block, in a fresh process."""
    result = run_script(
        "round_ratios.py", "--imgsz", "64", "--processes", "1", "--blocks", "2", "--rounds", "2", "--warmup", "0",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| k=0", "| k=8"))]
    assert len(rows) == 4, result.stdout
    assert all(float(cell) > 0 for row in rows for cell in row.split("|")[2:4]), rows


def test_training_spread_prints_both_estimators_the_ceiling_and_confidence_intervals(tmp_path):
    """Smoke run of scripts/training_spread.py: each estimator of the training ratio, the ceiling and the code's
    distance from it per process, with the mean and its 95% Student's t interval over the processes."""
    result = run_script("training_spread.py", "--quick", "--processes", "2", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    table = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] in ("of medians", "per round", "ceiling", "per round - ceiling"):
            table[cells[0]] = cells[1:]
    assert len(table) == 4, result.stdout
    for key in ("of medians", "per round", "ceiling"):
        assert all(float(cell) > 0 for cell in table[key][:2]), table
    distance = [float(a) - float(b) for a, b in zip(table["per round"][:2], table["ceiling"][:2])]
    assert [float(cell) for cell in table["per round - ceiling"][:2]] == pytest.approx(distance, abs=2e-3)
    for cells in table.values():  # process 1, process 2, median, sd, mean [95% CI]
        values, sd = [float(cell) for cell in cells[:2]], float(cells[3])
        mean, low, high = (float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cells[4]).groups())
        assert mean == pytest.approx(sum(values) / 2, abs=2e-3)
        half = 12.706 * sd / 2**0.5  # t at 97.5% with one degree of freedom
        assert (low, high) == pytest.approx((mean - half, mean + half), abs=0.01)  # sd printed to 3 decimals


def test_topk_profile_prints_each_op_at_both_topk(tmp_path):
    """Smoke run of scripts/topk_profile.py: per-op self times at k=0 and k=8, their difference and the totals."""
    result = run_script("topk_profile.py", "--imgsz", "64", "--rounds", "1", "--warmup", "0", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| aten::")]
    assert rows and all(len(row.split("|")) == 6 for row in rows), result.stdout
    (total,) = [line for line in result.stdout.splitlines() if line.startswith("| all ops")]
    k0, k8, difference = (float(cell) for cell in total.split("|")[2:5])
    assert k0 > 0 and k8 > 0 and difference == pytest.approx(k8 - k0, abs=2e-3)
