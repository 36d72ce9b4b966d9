"""Every Ultralytics task with PST, on the offline digits data (slow).

Per task (instance segmentation, pose, oriented boxes with YOLOv11-PST; detection with the NMS-free YOLO26-PST;
semantic segmentation and depth with YOLO26-PST): train 1 epoch on a tiny set with the stock ``yolo`` command in a
fresh interpreter (YOLO26-PST detection from a stock YOLO26n checkpoint, ``pretrained=``); ``val`` with rect at a size
that is not a multiple of the stride; then, on that checkpoint with BatchNorm statistics calibrated on the input (so
detections exist and the fine attention visibly acts: k=8 vs k=0 asserted), ``predict`` with saved task labels
(semantic and depth: saved maps) and ``pst-yolo export format=onnx topk=8`` with onnxruntime parity at k=8 (fp32,
1e-4; semantic: the class map ONNX bakes, equal wherever PyTorch's two best classes are not tied). val, predict and
export run in this process (``YOLO(...).val``/``.predict``, ``pst_yolo.cli.main``): a fresh interpreter adds
nothing past the train step (tests/test_end_to_end.py runs each command in its own). One trained and one calibrated
checkpoint per task are shared by the steps (module-scoped fixtures).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox

from pst_yolo import PST, PSAttn, set_topk
from pst_yolo.cli import main as cli_main
from pst_yolo.configs import stock_counterpart
from pst_yolo.tools.datasets import build_digits_detection
from pst_yolo.tools.task_datasets import KEYPOINT_NAMES, build_digits_task
from pst_yolo.tools.topk import run as topk_run

BIN = Path(sys.executable).parent
ENV = {**os.environ, "YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "true"}
IMGSZ = 64  # training images (P5 2x2)
EXPORT_IMGSZ = 128  # P5 4x4 = 16 upper tokens > k = 8, so top-k selects
ATOL = 1e-4
pytestmark = pytest.mark.slow

# task -> (model, columns of one `predict save_txt=True` row, or None: polygons of any length / maps, no text)
CASES = {
    "segment": ("yolo11n-seg-pst.yaml", None),
    "pose": ("yolo11n-pose-pst.yaml", 1 + 4 + 3 * len(KEYPOINT_NAMES)),
    "obb": ("yolo11n-obb-pst.yaml", 1 + 8),
    "detect": ("yolo26n-pst.yaml", 1 + 4),
    "semantic": ("yolo26n-sem-pst.yaml", None),
    "depth": ("yolo26n-depth-pst.yaml", None),
}
DENSE = {"semantic", "depth"}  # per-pixel heads: predict saves maps, not text rows
DENSE_METRIC = {"semantic": "mIoU", "depth": "delta1"}  # the rest: the detection family's mAP50(B)


def end2end(task: str) -> dict:
    """Ultralytics 8.4's ``nms=False`` for YOLO26 detection: val/predict/export through its NMS-free one-to-one head."""
    return {"nms": False} if task == "detect" else {}


def yolo(*args, cwd: Path, exe: str = "yolo") -> str:
    result = subprocess.run([str(BIN / exe), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{exe} {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def pst_yolo_cli(*args: str) -> None:
    """``pst-yolo *args`` in this process; the process-wide top-k override and ``sys.argv`` restored after."""
    argv = sys.argv[:]
    try:
        cli_main(list(args))
    finally:
        sys.argv[:] = argv
        PSAttn.override_topk(None)


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """(task, work dir, data.yaml, best.pt) after 1 epoch of ``yolo train`` on 8 images of 64 px."""
    task = request.param
    root = tmp_path_factory.mktemp(task)
    kwargs = {"train_images": 8, "val_images": 4, "imgsz": IMGSZ, "seed": 1}
    if task == "detect":
        data = build_digits_detection(root / "data", **kwargs)
    else:
        data = build_digits_task(root / "data", task, **kwargs)
    model = CASES[task][0]
    args = ["epochs=1", f"imgsz={IMGSZ}", "batch=4", "workers=0", "device=cpu", "plots=False", "seed=0"]
    if task == "detect":  # the head-start path: a stock YOLO26n checkpoint (built from its YAML) as `pretrained=`
        stock = root / "yolo26n-stock.pt"
        YOLO(stock_counterpart(model)).save(str(stock))
        args.append(f"pretrained={stock}")
    out = yolo(
        "train", f"task={task}", f"model={model}", f"data={data}", *args, f"project={root / 'runs'}", "name=t", cwd=root
    )
    if task == "detect":
        # 600 non-PST items, less the 12 class-output convs (80 -> 10 classes; Ultralytics rebuilds the rest of the
        # class branches at the stock width), plus 12 items in the PST rows that match by name and shape.
        assert "Transferred 600/716 items" in out, out[-3000:]
    best = root / "runs" / "t" / "weights" / "best.pt"
    assert best.exists()
    return task, root, data, best


def test_checkpoint_keeps_task_and_pst(trained):
    task, _, _, best = trained
    model = YOLO(str(best))
    assert model.task == task
    assert sum(isinstance(m, PST) for m in model.model.modules()) == 2
    if task == "detect":
        assert model.model.model[-1].one2one_cv2 is not None  # YOLO26's NMS-free head kept


def test_val_rect_at_odd_size(trained):
    task, root, data, best = trained
    metrics = YOLO(str(best)).val(data=str(data), imgsz=100, rect=True, batch=2, workers=0, **end2end(task),
                                  project=str(root / "runs"), name="v", plots=False)  # fmt: skip
    metric = f"metrics/{DENSE_METRIC.get(task, 'mAP50(B)')}"
    assert metric in metrics.results_dict, metrics.results_dict  # the task's own metric
    assert 0 <= metrics.results_dict[metric] <= 1


def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor) -> None:
    """BatchNorm (and PSA fine-K/V) statistics := those of ``images`` (B, 3, H, W), BatchNorm gains 0.3; then eval.

    One epoch on 8 images leaves near-initial statistics, under which the fine branch is invisible. Gains of 0.3, as in
    tests/test_export.py, keep the calibrated network's activations O(1): with unit gains it amplifies fp32 rounding
    about a thousandfold. Class biases are zeroed so that scores spread around 0.5 (no near-ties in YOLO26's top-k).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        torch.nn.init.constant_(m.weight, 0.3)
        m.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        model.train()(images)
    for m in norms:
        m.momentum = 0.03
    head = model.model[-1]
    for branch in [*getattr(head, "cv3", []), *(getattr(head, "one2one_cv3", None) or [])]:
        torch.nn.init.zeros_(branch[-1].bias)
    model.eval()


def letterboxed_val_images(data: Path, size: int) -> torch.Tensor:
    """The first two val images letterboxed to ``size`` as predict does: (2, 3, size, size) RGB in [0, 1]."""
    files = sorted((Path(data).parent / "images" / "val").glob("*.png"))[:2]
    images = [LetterBox((size, size), auto=False)(image=cv2.imread(str(f))) for f in files]
    return torch.from_numpy(np.stack(images)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """Every tensor of an eval forward's first element (seg: predictions and prototypes), as numpy."""
    with torch.no_grad():
        y = model(x)
    y = y[0] if isinstance(y, (list, tuple)) and isinstance(y[1], dict) else y  # (predictions, raw dict) in eval
    return [t.numpy() for t in (y if isinstance(y, (list, tuple)) else [y])]


@pytest.fixture(scope="module")
def calibrated(trained):
    """(task, work dir, data.yaml, calibrated.pt, (2, 3, 128, 128) val images it was calibrated on)."""
    task, root, data, best = trained
    x = letterboxed_val_images(data, EXPORT_IMGSZ)
    model = YOLO(str(best))
    calibrate_batchnorm(model.model.float(), x)
    checkpoint = root / "calibrated.pt"
    model.save(str(checkpoint))
    return task, root, data, checkpoint, x


def test_predict_writes_task_labels(calibrated):
    """``predict(save_txt=True)`` writes rows in the task's format (calibrated weights: scores around 0.5).

    Semantic and depth predictions are maps, which Ultralytics saves as images (``save=True``): one per source image.
    """
    task, root, data, checkpoint, _ = calibrated
    source = Path(data).parent / "images" / "val"
    run = {"imgsz": IMGSZ, "project": str(root / "runs"), "name": "p", "verbose": False}
    if task in DENSE:
        YOLO(str(checkpoint)).predict(source, save=True, **run)
        saved = sorted(f.stem for f in (root / "runs" / "p").iterdir() if f.suffix in {".jpg", ".png"})
        assert saved == sorted(f.stem for f in source.iterdir()), saved
        return
    YOLO(str(checkpoint)).predict(source, max_det=5, save_txt=True, **end2end(task), **run)
    rows = [r.split() for f in (root / "runs" / "p" / "labels").glob("*.txt") for r in f.read_text().splitlines()]
    assert rows, "no predictions written"
    columns = CASES[task][1]
    if columns is None:  # segment: class + polygon (x, y) pairs (an empty mask writes the class alone)
        assert all(len(row) % 2 == 1 for row in rows) and any(len(row) >= 1 + 6 for row in rows), rows[:3]
    else:
        assert all(len(row) == columns for row in rows), rows[:3]


def test_export_onnx_matches_torch_with_fine_attention(calibrated):
    task, root, _, checkpoint, x = calibrated
    assert_onnx_export_matches_torch(task, root, checkpoint, x)


def test_p2_export_onnx_matches_torch_with_fine_attention(tmp_path):
    """YOLO26-P2-PST (a P2/4 detection head; PST rows as YOLO26-PST's), BatchNorm calibrated on the input: its end2end
    ONNX export at k=8 holds PyTorch's detections."""
    data = build_digits_detection(tmp_path / "data", train_images=1, val_images=2, imgsz=IMGSZ, seed=1)
    x = letterboxed_val_images(data, EXPORT_IMGSZ)
    model = YOLO("yolo26n-p2-pst.yaml")
    calibrate_batchnorm(model.model, x)
    checkpoint = tmp_path / "yolo26n-p2-pst.pt"
    model.save(str(checkpoint))
    assert_onnx_export_matches_torch("detect", tmp_path, checkpoint, x)


def assert_onnx_export_matches_torch(task: str, root: Path, checkpoint: Path, x: torch.Tensor) -> None:
    """``pst-yolo export format=onnx topk=8`` of ``checkpoint`` equals PyTorch on ``x[:1]``, whose k=8 output moves
    visibly against k=0 (YOLO26 detection: through the NMS-free head, ``nms=False``)."""
    ort = pytest.importorskip("onnxruntime")
    reference = YOLO(str(checkpoint)).model.float()
    if task == "detect":  # YOLO26: the one-to-one head's (1, max_det, 6) output, as `nms=False` exports it;
        reference.end2end = True  # set before fuse(), which drops the head not selected
    reference = reference.fuse().eval()
    set_topk(reference, 0)
    coarse = outputs(reference, x[:1])
    set_topk(reference, 8)
    fine = outputs(reference, x[:1])
    moved = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-9)) for a, b in zip(coarse, fine))
    assert moved > 1e-3, f"k=8 output equals k=0 (relative change {moved:.1e}): fine attention not visible"

    args = ["format=onnx", f"imgsz={EXPORT_IMGSZ}", "topk=8", *(f"{k}={v}" for k, v in end2end(task).items())]
    pst_yolo_cli("export", f"model={checkpoint}", *args)
    session = ort.InferenceSession(str(checkpoint.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    logits = fine[0]
    if task in DENSE:  # the head's export output (upsampled depth; semantic: the baked class map), as ONNX has it
        head = reference.model[-1]
        head.export, head.format = True, "onnx"
        fine = outputs(reference, x[:1])
    assert len(exported) == len(fine)
    for ours, theirs in zip(fine, exported):
        assert ours.shape == theirs.shape
        if task == "detect":
            assert_same_detections(ours[0], theirs[0])
            continue
        if task == "semantic":
            print(f"\n[parity] semantic k=8 vs k=0 (logits): {moved:.1e}")
            assert_same_class_map(ours, theirs, logits)
            continue
        error = float((np.abs(ours - theirs) / np.maximum(np.abs(ours), 1.0)).max())  # relative above 1 (pixels)
        print(f"\n[parity] {task} k=8 {ours.shape}: max error {error:.1e} (k=8 vs k=0: {moved:.1e})")
        np.testing.assert_allclose(theirs, ours, rtol=ATOL, atol=ATOL)


def assert_same_class_map(ours: np.ndarray, theirs: np.ndarray, logits: np.ndarray) -> None:
    """Baked semantic maps (1, H, W) agree wherever PyTorch's two best classes are more than ``ATOL`` apart.

    ``logits`` (1, nc, H/8, W/8) are PyTorch's; upsampled as the head does, they tell which pixels are near-ties, where
    fp32 rounding may pick either class.
    """
    upsampled = F.interpolate(torch.from_numpy(logits), scale_factor=8, mode="bilinear", align_corners=False)
    top2 = upsampled.topk(2, dim=1).values[0].numpy()  # (2, H, W)
    differ = ours[0] != theirs[0]
    assert len(np.unique(ours)) > 1, "the class map is constant: nothing to compare"
    print(f"\n[parity] semantic k=8 {ours.shape}: {int(differ.sum())} of {differ.size} pixels differ")
    assert (top2[0] - top2[1])[differ].max(initial=0.0) < ATOL


def assert_same_detections(ours: np.ndarray, theirs: np.ndarray) -> None:
    """End2end outputs (max_det, 6) [x1, y1, x2, y2, score, class] hold the same detections within ``ATOL``.

    Top-k orders rows by score: where two scores agree to fp32 rounding, PyTorch and onnxruntime may order them (or,
    at the 300th place, pick them) differently, so rows are matched as a set: the scores agree position by position,
    and every PyTorch row clear of the selection boundary has an onnxruntime row equal to it within ``ATOL``.
    """
    assert ours.shape == theirs.shape == (300, 6)
    np.testing.assert_allclose(theirs[:, 4], ours[:, 4], rtol=ATOL, atol=ATOL)
    clear = ours[ours[:, 4] > ours[:, 4].min() + ATOL]
    assert len(clear) > 200
    errors = [(np.abs(theirs - row) / np.maximum(np.abs(row), 1.0)).max(1).min() for row in clear]
    print(f"\n[parity] detect (end2end) k=8: {len(clear)} rows, max error {max(errors):.1e}")
    assert max(errors) < ATOL


def test_topk_weighs_dense_tasks_with_their_own_metric(calibrated, tmp_path):
    """``pst-yolo topk`` on semantic (mIoU) and depth (delta1): intervals from per-image sums whose total is the
    validator's own fitness at every k (``choose`` checks it), not the highest-fitness fallback."""
    task, _, data, checkpoint, _ = calibrated
    if task not in DENSE:
        pytest.skip("the detection family and classification: tests/test_topk.py")
    val_kwargs = {"data": str(data), "imgsz": EXPORT_IMGSZ, "batch": 3, "device": "cpu", "workers": 0}
    summary = topk_run(checkpoint, [0, 8], False, tmp_path, "topk", val_kwargs, bootstrap=200, latency_rounds=2)
    decision = summary["decision"]
    assert decision["images"] == 4 and decision["metric"] == DENSE_METRIC[task]
    assert all(len(r["intervals"]["fitness"]) == 2 for r in summary["rows"]), summary["rows"]
