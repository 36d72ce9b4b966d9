"""Classification PST models: odd feature-map sizes, the fine branch at inference, training through the stock CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from ultralytics.nn.tasks import ClassificationModel, guess_model_task, yaml_model_load
from ultralytics.utils import ASSETS

import pst_yolo

NC = 7  # not the YAML's 1000: checks that the head follows the requested class count


MODELS = ("yolo11n-cls-pst", "r18-cls-pst")


@pytest.fixture(scope="module", params=MODELS)
def classifier(request):
    """An untrained classification PST model (built by short name) in eval mode, fine attention on (k=8)."""
    torch.manual_seed(0)
    model = ClassificationModel(f"{request.param}.yaml", nc=NC, verbose=False)
    calibrate_batchnorm(model, torch.rand(4, 3, 224, 224))
    assert pst_yolo.set_topk(model, 8) == 1  # one PST with one PSA block
    return model


def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's statistics (and PSA's fine-map K/V statistics) to those of ``images`` (B, 3, H, W), then
    switch to eval. Untrained, with default statistics, features shrink layer by layer and the logits are the bias."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        model.train()(images)
    model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_task_is_guessed_from_the_stock_head(name):
    assert guess_model_task(yaml_model_load(f"{name}.yaml")) == "classify"


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits (B, nc) of an eval-mode Ultralytics classifier (its forward returns (probabilities, logits))."""
    with torch.no_grad():
        return model(x)[1]


@pytest.mark.parametrize("imgsz", [224, 240])  # 240: fine map P4 15x15, upper map P5 8x8
def test_forward_is_finite_with_fine_attention(classifier, imgsz):
    out = logits(classifier, torch.rand(1, 3, imgsz, imgsz))
    assert out.shape == (1, NC)
    assert torch.isfinite(out).all()


def test_fine_attention_changes_the_output(classifier):
    x = torch.rand(1, 3, 240, 240)
    pst_yolo.set_topk(classifier, 0)
    coarse = logits(classifier, x)
    pst_yolo.set_topk(classifier, 8)
    fine = logits(classifier, x)
    assert not torch.allclose(coarse, fine)
    assert torch.equal(fine, logits(classifier, x))  # deterministic inference


def make_image_folder(root: Path, per_class: int = 4, size: int = 96) -> Path:
    """ImageFolder dataset (train/ and val/, classes bus and zidane) of crops of Ultralytics' two sample images."""
    for name in ("bus", "zidane"):
        image = cv2.imread(str(ASSETS / f"{name}.jpg"))
        h, w = image.shape[:2]
        for split in ("train", "val"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                y, x = (h - size) * i // per_class, (w - size) * (per_class - i) // per_class
                crop = image[y : y + size, x : x + size]
                cv2.imwrite(str(root / split / name / f"{i}.jpg"), crop if split == "train" else cv2.flip(crop, 1))
    return root


@pytest.mark.slow
def test_train_through_stock_cli(tmp_path):
    data = make_image_folder(tmp_path / "data")
    args = [
        str(Path(sys.executable).parent / "yolo"),
        "train",
        "model=yolo11n-cls-pst.yaml",
        f"data={data}",
        "imgsz=64",
        "epochs=1",
        "batch=4",
        "workers=0",
        "device=cpu",
        "plots=False",
        f"project={tmp_path / 'runs'}",
        "name=cls",
    ]
    env = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "true"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"yolo train failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert (tmp_path / "runs" / "cls" / "weights" / "best.pt").is_file()
