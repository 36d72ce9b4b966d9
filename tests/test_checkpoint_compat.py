"""Checkpoints saved by pst-yolo 0.1.0 still load, fuse, export and give the same outputs at k=0 and k=8.

``tests/data/pst-yolo-0.1.0-tiny.pt`` was saved with ``YOLO.save`` by pst-yolo 0.1.0 (commit a2ca0c1) from
``tests/data/tiny-pst.yaml`` with BatchNorm calibrated on Ultralytics' two bundled images at 96 px
(``pst_yolo.tools.calibration.calibrate_random_weights``), so the fine attention moves the outputs by ~0.1;
``pst-yolo-0.1.0-tiny-outputs.pt`` holds those images and 0.1.0's fp32 outputs at k=0 and k=8. Ultralytics pickles
whole modules: a class that moves, or an attribute that is added or renamed, shows here first.
"""

from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

from pst_yolo import PSAttn, set_topk

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "pst-yolo-0.1.0-tiny.pt"


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "pst-yolo-0.1.0-tiny-outputs.pt")


def outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[int, torch.Tensor]:
    result = {}
    for k in (0, 8):
        set_topk(model, k)
        with torch.no_grad():
            result[k] = model(images)[0]
    return result


def test_old_checkpoint_gives_its_outputs(recorded):
    model = YOLO(str(CHECKPOINT)).model.float().eval()
    assert sum(isinstance(m, PSAttn) for m in model.modules()) == 2
    got = outputs(model, recorded["images"])
    assert (recorded["k8"] - recorded["k0"]).abs().max() > 0.05  # the fine attention acts in this checkpoint
    for k in (0, 8):
        torch.testing.assert_close(got[k], recorded[f"k{k}"], atol=1e-4, rtol=1e-4)
    fused = outputs(model.fuse(), recorded["images"])
    for k in (0, 8):
        torch.testing.assert_close(fused[k], recorded[f"k{k}"], atol=1e-3, rtol=1e-3)


def test_old_checkpoint_trains_on(recorded):
    """Attributes added since 0.1.0 get their defaults: a train-mode step tracks the fine statistics."""
    model = YOLO(str(CHECKPOINT)).model.float().train()
    psa = next(m for m in model.modules() if isinstance(m, PSAttn))
    before = psa.fine_kv_var.clone()
    model(recorded["images"])
    assert int(psa.fine_stats_skipped) == 0 and not torch.equal(psa.fine_kv_var, before)


@pytest.mark.slow
def test_old_checkpoint_exports(recorded, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    for k in (0, 8):
        PSAttn.override_topk(k)
        try:
            path = YOLO(str(CHECKPOINT)).export(format="onnx", imgsz=96, batch=2, project=str(tmp_path))
        finally:
            PSAttn.override_topk(None)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: recorded["images"].numpy()})
        torch.testing.assert_close(torch.from_numpy(out), recorded[f"k{k}"], atol=1e-3, rtol=1e-3)
