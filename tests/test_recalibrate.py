"""``pst-yolo recalibrate``: fine-map statistics rebuilt from images, on a checkpoint that AMP training broke."""

import shutil

import pytest
import torch
from ultralytics import YOLO
from ultralytics.utils import ASSETS

from pst_yolo import PSAttn, set_topk
from pst_yolo.cli import main as cli
from pst_yolo.tools.calibration import BUNDLED_IMAGES, calibrate_random_weights, letterboxed
from pst_yolo.tools.recalibrate import recompute_fine_statistics

IMGSZ = 64


def psa_statistics(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.fine_kv_mean.clone(), m.fine_kv_var.clone()) for m in model.modules() if isinstance(m, PSAttn)]


@pytest.fixture
def calibrated():
    """YOLOv11-PST-N with every BN (and the fine statistics) set to those of the two bundled images."""
    yolo = YOLO("yolo11n-pst.yaml")
    x = torch.cat([letterboxed(name, (IMGSZ, IMGSZ)) for name in BUNDLED_IMAGES])
    calibrate_random_weights(yolo.model, x)
    return yolo, x


@pytest.mark.slow
def test_recompute_reproduces_the_training_statistics():
    """Calibrated in train mode on x with momentum 1, eval-mode features on x are the training features up to
    BatchNorm's unbiased running variance (training normalised with the biased one): at 640 px the recomputed
    statistics are those training tracked within a few percent (at 64 px, with 2x2 P5 maps, they are not)."""
    yolo = YOLO("yolo11n-pst.yaml")
    x = torch.cat([letterboxed(name, (640, 640)) for name in BUNDLED_IMAGES])
    calibrate_random_weights(yolo.model, x)
    expected = psa_statistics(yolo.model)
    for m in yolo.model.modules():
        if isinstance(m, PSAttn):
            m.fine_kv_var.fill_(float("inf"))
            m.fine_kv_mean.fill_(float("nan"))
    assert recompute_fine_statistics(yolo.model, [x]) == len(expected) == 2
    for (mean, var), (want_mean, want_var) in zip(psa_statistics(yolo.model), expected):
        assert (mean - want_mean).abs().max() < 0.03 * want_var.sqrt().max()
        assert ((var - want_var).abs() / want_var).max() < 0.05


def test_batches_are_averaged(calibrated):
    """Two batches give the average of their statistics (as update_bn's cumulative average)."""
    yolo, x = calibrated
    per_batch = []
    for part in (x[:1], x[1:]):
        recompute_fine_statistics(yolo.model, [part])
        per_batch.append(psa_statistics(yolo.model))
    recompute_fine_statistics(yolo.model, [x[:1], x[1:]])
    for got, first, second in zip(psa_statistics(yolo.model), *per_batch):
        for value, a, b in zip(got, first, second):
            torch.testing.assert_close(value, (a + b) / 2)


def test_refuses_a_fused_model(calibrated):
    yolo, x = calibrated
    yolo.model.fuse()
    with pytest.raises(ValueError, match="unfused"):
        recompute_fine_statistics(yolo.model, [x])


@pytest.mark.slow
def test_recalibrate_command_repairs_a_broken_checkpoint(calibrated, tmp_path):
    yolo, x = calibrated
    for m in yolo.model.modules():
        if isinstance(m, PSAttn):
            m.fine_kv_var.fill_(float("nan"))  # as AMP training before pst-yolo 0.2 left it
    broken = tmp_path / "broken.pt"
    yolo.save(str(broken))
    images = tmp_path / "images"
    images.mkdir()
    for name in BUNDLED_IMAGES:
        shutil.copy(ASSETS / name, images / name)
    cli(["recalibrate", f"model={broken}", f"source={images}", f"imgsz={IMGSZ}", "batch=2"])
    outputs = []
    for path in (broken, tmp_path / "broken-recalibrated.pt"):
        model = YOLO(str(path)).model.float().eval()
        for k in (0, 8):
            set_topk(model, k)
            with torch.no_grad():
                outputs.append(model(x)[0])
    broken_k0, broken_k8, fixed_k0, fixed_k8 = outputs
    assert not broken_k8.isfinite().all() and broken_k0.isfinite().all()
    assert fixed_k8.isfinite().all() and (fixed_k8 - fixed_k0).abs().max() > 1e-2
    torch.testing.assert_close(fixed_k0, broken_k0)  # nothing but the fine statistics changed


@pytest.mark.parametrize(
    "argv,message",
    [
        (["model=x.pt"], "bad arguments"),
        (["model=missing.pt", "source=."], "checkpoint file"),
        (["model={ckpt}", "source=nowhere"], "folder of images"),
        (["model={ckpt}", "source=.", "batch=0"], "positive integer"),
        (["model={ckpt}", "source=.", "topk=3"], "bad arguments"),
    ],
)
def test_bad_arguments(argv, message, tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit, match=message):
        cli(["recalibrate", *(a.format(ckpt=ckpt) for a in argv)])
