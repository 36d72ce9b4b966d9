"""Random weights that let the fine attention act, and the fp32 reference the export and precision checks compare to.

A random-init model in eval mode hides the fine branch: BatchNorm running statistics at init shrink deep features to
~1e-7, so top-k 8 and top-k 0 outputs differ by ~1e-7 and a dropped fine branch would pass any parity check.
:func:`calibrate_random_weights` re-initialises the convs and sets every BatchNorm's statistics (the PSA fine K/V
statistics too) to those of a given batch, after which the fine attention moves detection outputs by ~0.1-0.2.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

BUNDLED_IMAGES = ("bus.jpg", "zidane.jpg")  # Ultralytics' own assets: no download


def letterboxed_files(files: list[str | Path], hw: tuple[int, int]) -> torch.Tensor:
    """Image files letterboxed to hw as predict does (no rect): (B, 3, H, W) RGB float32 in [0, 1]."""
    import cv2
    from ultralytics.data.augment import LetterBox

    letterbox = LetterBox(hw, auto=False)
    images = [letterbox(image=cv2.imread(str(f))) for f in files]  # (H, W, 3) BGR uint8 each
    return torch.stack([torch.from_numpy(im[..., ::-1].transpose(2, 0, 1).copy()) for im in images]).float() / 255


def letterboxed(name: str, hw: tuple[int, int]) -> torch.Tensor:
    """Ultralytics' bundled image ``name`` letterboxed to hw as predict does (no rect): (1, 3, H, W) RGB in [0, 1]."""
    from ultralytics.utils import ASSETS

    return letterboxed_files([ASSETS / name], hw)


def calibrate_random_weights(model: nn.Module, batch: torch.Tensor) -> None:
    """Re-initialise every conv and calibrate every BatchNorm (and PSA fine-K/V statistics) on ``batch`` (B, 3, H, W).

    One train-mode forward with momentum 1 sets the running statistics to this batch's. BatchNorm gains are set to
    0.3: with unit gains a random network calibrated this way amplifies fp32 rounding about a thousandfold (fp32 and
    fp64 PyTorch differ by ~1e-3); at 0.3 they differ by ~1e-6, as for trained weights, while the fine attention still
    moves the outputs by ~0.2. The detection head's class biases are zeroed so that class scores spread around 0.5
    instead of ~1e-4. Leaves the model in eval mode.
    """
    from ultralytics.nn.modules import Detect

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


def calibrated_checkpoint(yaml_name: str, batch: torch.Tensor, path: str | Path) -> Path:
    """Build ``yaml_name``, calibrate it on ``batch`` (:func:`calibrate_random_weights`), save with ``YOLO.save``."""
    from ultralytics import YOLO

    yolo = YOLO(yaml_name)
    calibrate_random_weights(yolo.model, batch)
    yolo.save(str(path))
    return Path(path)


def reference_model(checkpoint: str | Path, k: int | None = None) -> nn.Module:
    """The fused fp32 eval PyTorch model of ``checkpoint``, with top-k ``k`` on every PSA module unless None."""
    from ultralytics import YOLO

    from ..nn.pst import set_topk

    model = YOLO(str(checkpoint)).model.float().fuse().eval()
    if k is not None:
        set_topk(model, k)
    return model


def max_abs_diff(reference, output, task: str, size: int) -> float:
    """Largest |difference| of two outputs (numpy arrays): detection boxes (first 4 rows) divided by the input size,
    class probabilities compared as logs (softmax over 1000 classes: probabilities ~1e-3), anything else as it is."""
    import numpy as np

    reference, output = np.asarray(reference, dtype=np.float64), np.asarray(output, dtype=np.float64)
    if task == "classify":
        reference, output = np.log(reference), np.log(output)
    diff = np.abs(reference - output)
    if task == "detect":
        diff[:, :4] /= size
    return float(diff.max())


@contextlib.contextmanager
def openvino_compile_config(**extra):
    """Add ``extra`` properties to every ``openvino.Core.compile_model`` call inside the block.

    Ultralytics' AutoBackend builds its own ``ov.Core()`` and compiles with ``{"PERFORMANCE_HINT": "LATENCY"}``
    (f32 forced only on Windows and Linux ARM64), so a property set on another Core does not reach it. On CPUs with
    native bf16 OpenVINO's default precision is bf16; ``INFERENCE_PRECISION_HINT="f32"`` makes ``YOLO(<openvino
    dir>)`` match fp32 PyTorch (docs/EXPORT.md, "OpenVINO").

    Example:
        >>> with openvino_compile_config(INFERENCE_PRECISION_HINT="f32"):  # doctest: +SKIP
        ...     results = YOLO("best_openvino_model/").val(data="data.yaml")
    """
    import openvino as ov

    original = ov.Core.compile_model

    def compile_model(self, model, device_name=None, config=None, **kwargs):
        return original(self, model, device_name, {**(config or {}), **extra}, **kwargs)

    ov.Core.compile_model = compile_model
    try:
        yield
    finally:
        ov.Core.compile_model = original
