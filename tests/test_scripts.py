"""The reproduction scripts: --help in a fresh interpreter without a GPU, and clear errors for a missing data set or
too few GPUs (run in this process, as ``python scripts/<name>`` runs them)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the scripts end to end: the full suite, not the fast tier

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TRAIN_VAL = ("train_coco.py", "val_coco.py", "train_imagenet.py", "val_imagenet.py")


def run_script_fresh(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run scripts/<name> in a fresh interpreter, offline, with a private Ultralytics config dir."""
    env = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], check=False, capture_output=True, text=True,
                          env=env, timeout=180, cwd=tmp_path)  # fmt: skip


def run_script(name: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run scripts/<name> as ``__main__`` in this process (cwd ``tmp_path``), as the interpreter would: a SystemExit
    message goes to stderr with exit status 1."""
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    command, argv = [str(SCRIPTS / name), *args], sys.argv[:]
    sys.argv[:] = command
    try:
        with contextlib.chdir(tmp_path), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):
            stderr.write(e.code)
        returncode = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv[:] = argv
    return subprocess.CompletedProcess(command, returncode, stdout.getvalue(), stderr.getvalue())


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


@pytest.mark.parametrize("name", [*TRAIN_VAL, "reproduce_tables.py", "quantization.py"])
def test_help(name, tmp_path):
    result = run_script_fresh(name, "--help", tmp_path=tmp_path)
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


def test_quantization_without_demo_checkpoints_says_run_demo(tmp_path):
    """scripts/quantization.py defaults to `pst-yolo demo`'s checkpoints; without them it names the missing file."""
    result = run_script("quantization.py", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "runs/pst-demo/runs/yolo11n-pst/weights/best.pt: no such file" in result.stderr
    assert "run `pst-yolo demo` first" in result.stderr


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
