"""Helpers shared by the export tests: bundled images, BN-calibrated checkpoints, fp32/fp64 references.

A random-init model in eval mode hides the fine attention (deep features shrink to ~1e-7), so every export test
starts from ``calibrated_checkpoint`` (pst_yolo.tools.calibration): convs re-initialised, BatchNorm statistics
calibrated on the input.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pst_yolo import PSAttn
from pst_yolo.ops import export_compat
from pst_yolo.tools.calibration import BUNDLED_IMAGES as IMAGES  # noqa: F401  (re-exported for the tests)
from pst_yolo.tools.calibration import (  # noqa: F401  (re-exported for the tests)
    calibrate_random_weights,
    calibrated_checkpoint,
    letterboxed,
    max_abs_diff,
    reference_model,
)

RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def assert_standard_graph(path: str | Path, k: int) -> None:
    """Fine selection as TopK + GatherElements iff k > 0; no random ops, no custom domains, TensorRT-parsable."""
    import onnx

    from pst_yolo.tools.tensorrt_check import check_tensorrt_compatible

    model = onnx.load(str(path))
    ops = Counter(node.op_type for node in model.graph.node)
    assert (ops["TopK"] > 0) == (k > 0), ops
    assert (ops["GatherElements"] + ops["Gather"] > 0) if k else ops["GatherElements"] == 0, ops
    assert not RANDOM_OPS & set(ops), ops
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert check_tensorrt_compatible(path) == []


@contextlib.contextmanager
def topk_override(k: int | None):
    """Force top-k ``k`` on every PSA module (what ``pst-yolo ... topk=K`` does) inside the block."""
    PSAttn.override_topk(k)
    try:
        yield
    finally:
        PSAttn.override_topk(None)


@contextlib.contextmanager
def query_blocks_as_at_640():
    """Trace attention in query blocks at the converter tests' 160 px as a 640 px export does: the P3 layer's 40K
    logits in 5 blocks of 2^13 (:func:`pst_yolo.ops.export_compat.traced_query_blocks`; 640 px: 10 blocks of 2^20)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_compat, "TRACED_BLOCK_ELEMENTS", 1 << 13)
        yield


def torch_output(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        y = model(x)
    return (y[0] if isinstance(y, (list, tuple)) else y).numpy()


def ort_output(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """First output of the ONNX graph at ``path`` on x (B, 3, H, W), ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def openvino_output(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """First output of the OpenVINO model in folder ``path`` on x (B, 3, H, W), in fp32: on CPUs with native bf16
    OpenVINO's default precision is bf16, which moves outputs by ~1e-2 (docs/EXPORT.md)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(next(Path(path).glob("*.xml"))), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x.numpy())[0]


def mean_abs_diff(reference: np.ndarray, output: np.ndarray, size: int) -> float:
    """Mean |difference| of two detection outputs (B, 4 + nc, A), boxes (first 4 rows) in units of the input size:
    the measure of quantization error (a max over 10^4 values would track one outlier, not the quantizer)."""
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(output, np.float64))
    diff[:, :4] /= size
    return float(diff.mean())


def mean_run_diff(reference: list[np.ndarray], output: list[np.ndarray], size: int) -> float:
    """:func:`mean_abs_diff` averaged over two runs' outputs on the same images, image by image."""
    return float(np.mean([mean_abs_diff(a, b, size) for a, b in zip(reference, output)]))


def assert_same_boxes(ours, theirs, xyxy_atol: float, conf_atol: float) -> None:
    """Ultralytics ``Boxes`` of one image from two runtimes: the same boxes, matched by position (two near-equal scores
    may be listed in either order), with the same class, corners within ``xyxy_atol`` pixels and scores within
    ``conf_atol``."""
    assert len(ours) == len(theirs)
    if not len(ours):
        return
    distance = np.abs(ours.xyxy.numpy()[:, None] - theirs.xyxy.numpy()[None]).max(-1)  # (ours, theirs) pixels
    match = distance.argmin(1)
    assert sorted(match) == list(range(len(theirs))), "each box must have its own counterpart"
    np.testing.assert_array_equal(ours.cls.numpy(), theirs.cls.numpy()[match])
    np.testing.assert_allclose(ours.xyxy.numpy(), theirs.xyxy.numpy()[match], atol=xyxy_atol)
    np.testing.assert_allclose(ours.conf.numpy(), theirs.conf.numpy()[match], atol=conf_atol)
