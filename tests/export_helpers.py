"""Helpers shared by the export tests: bundled images, BN-calibrated checkpoints, fp32/fp64 references.

A random-init model in eval mode hides the fine attention (deep features shrink to ~1e-7), so every export test
starts from :func:`woken_checkpoint`: convs re-initialised, BatchNorm statistics calibrated on the input.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.nn.modules import Detect
from ultralytics.utils import ASSETS

from pst_yolo import PSAttn, set_topk

IMAGES = ("bus.jpg", "zidane.jpg")


def letterboxed(name: str, hw: tuple[int, int]) -> torch.Tensor:
    """Ultralytics' bundled image ``name`` letterboxed to hw as predict does (no rect): (1, 3, H, W) RGB in [0, 1]."""
    import cv2

    image = LetterBox(hw, auto=False)(image=cv2.imread(str(ASSETS / name)))
    return torch.from_numpy(image[..., ::-1].transpose(2, 0, 1).copy()).float()[None] / 255


def wake_up(model: nn.Module, batch: torch.Tensor) -> None:
    """Re-initialise every conv and calibrate every BatchNorm (and PSA fine-K/V statistics) on ``batch`` (B, 3, H, W).

    BatchNorm gains are set to 0.3: with unit gains a random network calibrated this way amplifies fp32 rounding
    about a thousandfold (fp32 and fp64 PyTorch differ by ~1e-3); at 0.3 they differ by ~1e-6, as for trained weights,
    while the fine attention still moves the outputs by ~0.2. The detection head's class biases are zeroed so that
    class scores spread around 0.5 instead of ~1e-4.
    """
    torch.manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    for m in norms:
        m.reset_running_stats()
        nn.init.constant_(m.weight, 0.3)
        m.momentum = 1.0  # running statistics := statistics of this one batch
    with torch.no_grad():
        model.train()(batch)
    for m in norms:
        m.momentum = 0.03
    for m in model.modules():
        if isinstance(m, Detect):
            for branch in m.cv3:
                nn.init.zeros_(branch[-1].bias)
    model.eval()


@contextlib.contextmanager
def topk_override(k: int | None):
    """Force top-k ``k`` on every PSA module (what ``pst-yolo ... topk=K`` does) inside the block."""
    PSAttn.override_topk(k)
    try:
        yield
    finally:
        PSAttn.override_topk(None)


def reference_model(checkpoint: Path, k: int) -> nn.Module:
    """The fused fp32 eval PyTorch model of ``checkpoint`` with top-k ``k``."""
    model = YOLO(str(checkpoint)).model.float().fuse().eval()
    set_topk(model, k)
    return model


def torch_output(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        y = model(x)
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def ort_output(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """First output of the ONNX graph at ``path`` on x (B, 3, H, W), ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def max_abs_diff(reference: np.ndarray, output: np.ndarray, task: str, size: int) -> float:
    """Largest |difference|: detection boxes (first 4 rows) divided by the input size, class probabilities as logs."""
    reference, output = reference.astype(np.float64), output.astype(np.float64)
    if task == "classify":  # softmax over 1000 classes: probabilities ~1e-3, compare log-probabilities
        reference, output = np.log(reference), np.log(output)
    diff = np.abs(reference - output)
    if task == "detect":
        diff[:, :4] /= size
    return float(diff.max())


def woken_checkpoint(yaml_name: str, batch: torch.Tensor, path: Path) -> Path:
    """Build ``yaml_name``, wake it up on ``batch`` (:func:`wake_up`) and save it with ``YOLO.save`` to ``path``."""
    model = YOLO(yaml_name)
    wake_up(model.model, batch)
    model.save(str(path))
    return path
