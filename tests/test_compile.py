"""``torch.compile`` (inductor, CPU) of PST models against eager, on BatchNorm-calibrated weights.

Inductor on the CPU builds every fused kernel with the host C++ compiler: minutes per module on 2 cores. CI therefore
compiles the P3 block's Pyramid Sparse Attention module (projections, the op at k=0 and k=8, the CPE) in place
inside an otherwise eager YOLOv11-PST-N, so it sees calibrated activations; the whole-model compile and ``yolo train
... compile=True`` are marked slow and run when ``PST_YOLO_FULL_COMPILE=1`` (measured times in docs/CUDA.md).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from psa_precision import calibrated_yolo11n_pst, output_difference

from pst_yolo import PSAttn, set_topk

IMGSZ = 96  # P3 PSA: 12x12 queries over 6x6 keys; P4: 6x6 over 3x3 (k=8 of 9)
FULL = pytest.mark.skipif(
    os.environ.get("PST_YOLO_FULL_COMPILE") != "1", reason="minutes of C++ compilation: set PST_YOLO_FULL_COMPILE=1"
)


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return output_difference(a, b, IMGSZ)


@pytest.fixture(scope="module")
def calibrated():
    return calibrated_yolo11n_pst(IMGSZ)


def eager_and_compiled(model, x, whole_model: bool) -> dict:
    """Outputs at k=0 and k=8: eager, then with the last PSA module (or the whole model) compiled by inductor."""
    torch._dynamo.reset()
    outputs = {}
    for topk in (0, 8):
        set_topk(model, topk)
        with torch.no_grad():
            outputs[("eager", topk)] = model(x)[0]
    block = [m for m in model.modules() if any(isinstance(c, PSAttn) for c in m.children())][-1]  # P3 PSA's parent
    original = block.attn
    if whole_model:
        compiled_model = torch.compile(model, backend="inductor")
    else:
        compiled_model, block.attn = model, torch.compile(original, backend="inductor")
    try:
        for topk in (0, 8):
            set_topk(model, topk)
            start = time.perf_counter()
            with torch.no_grad():
                outputs[("compiled", topk)] = compiled_model(x)[0]
            outputs[("seconds", topk)] = time.perf_counter() - start
    finally:
        block.attn = original
    return outputs


def assert_matches(outputs: dict, label: str) -> None:
    fine_effect = difference(outputs[("eager", 8)], outputs[("eager", 0)])
    errors = {k: difference(outputs[("compiled", k)], outputs[("eager", k)]) for k in (0, 8)}
    print(
        f"\n{label}: compiled vs eager k=0 {errors[0]:.1e}, k=8 {errors[8]:.1e} (k=8 vs k=0 eager {fine_effect:.3f}); "
        f"first call incl. compilation k=0 {outputs[('seconds', 0)]:.0f} s, k=8 {outputs[('seconds', 8)]:.0f} s"
    )
    assert fine_effect > 0.02, "the fine branch must act on calibrated weights"
    assert errors[0] < 1e-4 and errors[8] < 1e-4, errors


@pytest.mark.slow
def test_compiled_psa_module_matches_eager(calibrated):
    model, x = calibrated
    assert_matches(eager_and_compiled(model, x, whole_model=False), "P3 PSA module compiled")


@pytest.mark.slow
@FULL
def test_compiled_model_matches_eager(calibrated):
    model, x = calibrated
    assert_matches(eager_and_compiled(model, x, whole_model=True), "whole model compiled")


@pytest.mark.slow
@FULL
def test_yolo_train_compile_one_epoch(tmp_path):
    from pst_yolo.tools.datasets import build_digits_detection

    data = build_digits_detection(tmp_path / "data", train_images=8, val_images=4, imgsz=64)
    env = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_CONFIG_DIR": str(tmp_path)}
    args = [f"data={data}", "epochs=1", "imgsz=64", "batch=4", "workers=0", "device=cpu", "compile=True"]
    args += ["model=yolo11n-pst.yaml", "plots=False", f"project={tmp_path / 'runs'}", "name=c", "exist_ok=True"]
    start = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "yolo"), "train", *args],
        env=env, capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    log = result.stdout + result.stderr
    print(f"\nyolo train compile=True, 1 epoch: {time.perf_counter() - start:.0f} s")
    assert result.returncode == 0, log[-4000:]
    assert "starting torch.compile" in log and "continuing uncompiled" not in log, log[-4000:]
    assert (tmp_path / "runs" / "c" / "weights" / "best.pt").exists()
