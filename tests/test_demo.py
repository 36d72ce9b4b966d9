"""The offline digits data set and ``pst-yolo demo`` end to end through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pst_yolo.tools.datasets import build_digits_detection

PST_YOLO = Path(sys.executable).with_name("pst-yolo")


def read_labels(root: Path, split: str) -> np.ndarray:
    """All label rows of a split as an (N, 5) array: class, x_center, y_center, width, height."""
    rows = [
        line.split() for f in sorted((root / "labels" / split).glob("*.txt")) for line in f.read_text().splitlines()
    ]
    return np.array(rows, dtype=float).reshape(-1, 5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A small built digits data set (12 train, 5 val images at 64 px)."""
    return build_digits_detection(tmp_path_factory.mktemp("digits"), train_images=12, val_images=5, imgsz=64, seed=3)


def test_digits_counts_and_yaml(digits):
    root = digits.parent
    data = yaml.safe_load(digits.read_text())
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == root.resolve()
    assert data["names"] == {i: str(i) for i in range(10)}
    for split, count in (("train", 12), ("val", 5)):
        images = sorted((root / "images" / split).glob("*.png"))
        labels = sorted((root / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        assert [p.stem for p in images] == [p.stem for p in labels]


def test_digits_labels_valid(digits):
    for split in ("train", "val"):
        rows = read_labels(digits.parent, split)
        assert len(rows) > 0
        classes, boxes = rows[:, 0], rows[:, 1:]
        assert np.all(classes == classes.round()) and classes.min() >= 0 and classes.max() <= 9
        assert np.all(boxes[:, 2:] > 0)
        assert np.all(boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6) and np.all(boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6)


def test_digits_deterministic(tmp_path):
    a = build_digits_detection(tmp_path / "a", train_images=3, val_images=2, imgsz=64, seed=7).parent
    b = build_digits_detection(tmp_path / "b", train_images=3, val_images=2, imgsz=64, seed=7).parent
    c = build_digits_detection(tmp_path / "c", train_images=3, val_images=2, imgsz=64, seed=8).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".png", ".txt"))
    assert len(files) == 10
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_demo_help():
    result = subprocess.run([str(PST_YOLO), "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--epochs", "--imgsz", "--train-images", "--val-images", "--model", "--baseline", "--device",
                   "--workers", "--out"):  # fmt: skip
        assert option in result.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """Both models train 1 epoch on 16 images at 64 px, the table prints, the plots exist (about 40 s)."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}  # the demo sets its own, offline
    args = ["demo", "--epochs", "1", "--train-images", "16", "--val-images", "8", "--imgsz", "64", "--out", str(out)]
    result = subprocess.run([str(PST_YOLO), *args], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| model | mAP50 | mAP50-95 |" in result.stdout
    for label in ("yolo12n", "yolo11n-pst-k0", "yolo11n-pst-k8"):
        assert f"| {label} |" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [row["model"] for row in summary["rows"]] == ["yolo12n", "yolo11n-pst-k0", "yolo11n-pst-k8"]
    for run in ("yolo12n", "yolo11n-pst"):
        for plot in ("results.png", "confusion_matrix.png", "val_batch0_pred.jpg"):
            assert (out / "runs" / run / plot).is_file(), f"{run}/{plot} missing"
    assert (out / "ultralytics-config" / "Ultralytics" / "Arial.ttf").is_file()  # plots' font, installed offline
