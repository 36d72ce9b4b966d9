"""Helpers shared by the export tests: bundled images, BN-calibrated checkpoints, fp32/fp64 references.

A random-init model in eval mode hides the fine attention (deep features shrink to ~1e-7), so every export test
starts from ``calibrated_checkpoint`` (pst_yolo.tools.calibration): convs re-initialised, BatchNorm statistics
calibrated on the input.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from ultralytics import YOLO

from pst_yolo import PSAttn, set_topk
from pst_yolo.tools.calibration import BUNDLED_IMAGES as IMAGES  # noqa: F401  (re-exported for the tests)
from pst_yolo.tools.calibration import calibrate_random_weights, calibrated_checkpoint, letterboxed  # noqa: F401


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
