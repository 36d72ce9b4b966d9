"""Export to the formats whose packages conflict with the main environment: LiteRT, TensorFlow SavedModel, CoreML.

TensorFlow pins numpy < 2.2 and coremltools numpy <= 2.3.5, so these run in a separate environment (CI: ``.ci/run``):

    pip install -e ".[export-litert,export-tf,export-coreml]" pytest
    PST_YOLO_REQUIRE_FORMATS=tflite,saved_model,coreml pytest -m isolated_export tests/test_export_isolated.py

Without a format's packages its tests skip with the reason, unless the format is listed in PST_YOLO_REQUIRE_FORMATS:
then they fail, so CI cannot pass a format by skipping it. Each format is exported through Ultralytics' own exporter
(``YOLO(ckpt).export(format=...)``) from a BN-calibrated yolo11n-pst (tests/export_helpers.py) at k=8; the LiteRT and
SavedModel files run in their own runtimes against fp32 PyTorch at k=8, whose output differs visibly from k=0's, and
through Ultralytics' predictor; LiteRT also as static INT8 (``quantize=8``, calibrated on the offline digits set).
Their converters are not run at k=0: every op of the k=0 graph is in the k=8 graph, in each form a converter reads
(ONNX, TorchScript, ``torch.export``; tests/test_export.py::test_k0_graph_ops_are_a_subset_of_k8). CoreML runs only
on macOS: on Linux the test converts at k=0 and k=8 and reads the ML program. Every export cuts its attention into
query blocks as a 640 px export does (:func:`export_helpers.query_blocks_as_at_640`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import (
    IMAGES,
    calibrated_checkpoint,
    letterboxed,
    max_abs_diff,
    mean_run_diff,
    query_blocks_as_at_640,
    reference_model,
    topk_override,
    torch_output,
)
from ultralytics import YOLO

pytestmark = pytest.mark.isolated_export

IMGSZ = 160
ATOL = 1e-4  # fp32; boxes in units of the input size
REQUIRED = {name for name in os.environ.get("PST_YOLO_REQUIRE_FORMATS", "").split(",") if name}
PACKAGES = {  # format: (modules its export and runtime import, extra that installs them)
    "tflite": (("litert_torch", "ai_edge_litert"), "export-litert"),
    "saved_model": (("tensorflow", "tf_keras", "onnx2tf", "onnx", "onnxruntime"), "export-tf"),
    "coreml": (("coremltools",), "export-coreml"),
}
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def missing_packages(format: str) -> str | None:
    """Why ``format`` cannot be tested here (its packages are not installed), or None."""
    modules, extra = PACKAGES[format]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{format} export needs {', '.join(missing)}: pip install 'pst-yolo[{extra}]' (separate venv)"


def formats(*names: str) -> list:
    """``names`` as parameters, each skipped at collection (before any export) when its packages are missing, unless
    PST_YOLO_REQUIRE_FORMATS lists it: then its test runs and fails in :func:`require`."""
    params = []
    for name in names:
        reason = missing_packages(name)
        skip = reason is not None and name not in REQUIRED
        params.append(pytest.param(name, marks=pytest.mark.skipif(skip, reason=reason or "")))
    return params


def require(format: str) -> None:
    """Fail with the reason when ``format``'s packages are missing (a format CI requires must not pass by skipping)."""
    reason = missing_packages(format)
    if reason:
        pytest.fail(f"{reason}; required by PST_YOLO_REQUIRE_FORMATS")


@pytest.fixture(scope="module", autouse=True)
def query_blocks():
    """Every export of this module cuts its attention into query blocks, as exports at 640 px do."""
    with query_blocks_as_at_640():
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-isolated")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Both bundled images letterboxed to IMGSZ x IMGSZ: (2, 3, IMGSZ, IMGSZ) RGB in [0, 1]."""
    return torch.cat([letterboxed(name, (IMGSZ, IMGSZ)) for name in IMAGES])


@pytest.fixture(scope="module")
def checkpoint(workdir, images) -> Path:
    return calibrated_checkpoint("yolo11n-pst.yaml", images, workdir / "yolo11n-pst.pt")


@pytest.fixture(scope="module")
def exported(workdir, checkpoint):
    """``exported(format, k)``: the file Ultralytics' exporter writes for ``format`` at top-k ``k`` (cached)."""
    cache = {}

    def export(format: str, k: int) -> Path:
        if (format, k) not in cache:
            require(format)
            folder = workdir / f"{format}-k{k}"
            folder.mkdir()
            copy = shutil.copy(checkpoint, folder / "yolo11n-pst.pt")
            if format == "saved_model":  # Ultralytics fetches onnx2tf's INT8 calibration sample (offline here: make it)
                calibration_sample(folder / ONNX2TF_SAMPLE)
            with topk_override(k), contextlib.chdir(folder):
                cache[format, k] = Path(YOLO(str(copy)).export(format=format, imgsz=IMGSZ))
        return cache[format, k]

    return export


def calibration_sample(path: Path) -> None:
    """onnx2tf's calibration sample (20, 128, 128, 3) float32 in [0, 1], made from the bundled images."""
    sample = torch.cat([letterboxed(name, (128, 128)) for name in IMAGES]).permute(0, 2, 3, 1)
    np.save(path, sample.repeat(10, 1, 1, 1).numpy())


def litert_output(path: Path, x: torch.Tensor) -> np.ndarray:
    """First output of the .tflite at ``path`` on x (1, 3, H, W) in LiteRT's interpreter; boxes back in pixels."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.numpy())
    interpreter.invoke()
    y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()
    y[:, [0, 2]] *= x.shape[3]  # Ultralytics' LiteRT export normalises boxes by the input size
    y[:, [1, 3]] *= x.shape[2]
    return y


def saved_model_output(path: Path, x: torch.Tensor) -> np.ndarray:
    """Output of the SavedModel at ``path`` on x (1, 3, H, W), run NHWC in TensorFlow (boxes in pixels)."""
    import tensorflow as tf

    model = tf.saved_model.load(str(path))  # kept alive while its function runs (it owns the variables)
    y = model.serving_default(tf.constant(x.permute(0, 2, 3, 1).numpy()))
    return (next(iter(y.values())) if isinstance(y, dict) else y).numpy()


RUNTIMES = {"saved_model": saved_model_output, "tflite": litert_output}


@pytest.mark.parametrize("format", formats(*RUNTIMES))
def test_runtime_matches_torch_and_carries_fine_attention(format, exported, checkpoint, images):
    """In the format's runtime at k=8: fp32 PyTorch's k=8 output within ATOL, visibly unlike PyTorch's k=0 output."""
    path, fine, coarse = exported(format, 8), reference_model(checkpoint, 8), reference_model(checkpoint, 0)
    for name, x in zip(IMAGES, images.split(1)):  # static graphs of batch 1
        output = RUNTIMES[format](path, x)
        diff = max_abs_diff(torch_output(fine, x), output, "detect", IMGSZ)
        fine_effect = max_abs_diff(torch_output(coarse, x), output, "detect", IMGSZ)
        print(f"\n[parity] {format} k=8 {name} {tuple(x.shape)}: max|export - torch fp32| = {diff:.2e}; "
              f"vs torch k=0: {fine_effect:.2e}")  # fmt: skip
        assert diff < ATOL, (format, name, diff)
        assert fine_effect > 1e-2, (format, name, fine_effect)


@pytest.mark.parametrize("format", formats(*RUNTIMES))
def test_predict_exported_gives_pt_boxes(format, exported, checkpoint, images):
    """``YOLO(exported).predict`` finds the boxes ``YOLO(best.pt).predict`` finds (same square input for both)."""
    path = exported(format, 8)
    sources = [np.ascontiguousarray(x.permute(1, 2, 0).flip(-1).mul(255).round().byte().numpy()) for x in images]
    kwargs = {"imgsz": IMGSZ, "conf": 0.6, "verbose": False}
    with topk_override(8):
        ours = YOLO(str(checkpoint)).predict(sources, **kwargs)
    theirs = YOLO(str(path), task="detect").predict(sources, **kwargs)
    assert sum(len(r.boxes) for r in ours) > 0
    for a, b in zip(ours, theirs):
        assert len(a.boxes) == len(b.boxes)
        np.testing.assert_array_equal(a.boxes.cls.numpy(), b.boxes.cls.numpy())
        np.testing.assert_allclose(a.boxes.xyxy.numpy(), b.boxes.xyxy.numpy(), atol=0.02)  # pixels
        np.testing.assert_allclose(a.boxes.conf.numpy(), b.boxes.conf.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def digits(workdir) -> tuple[Path, list[torch.Tensor]]:
    """The offline digits set's data.yaml (INT8 calibration data) and its 16 val images, each (1, 3, IMGSZ, IMGSZ).

    INT8 calibrates on the images the BN statistics come from (tests/test_quantize.py says why)."""
    from pst_yolo.tools.calibration import letterboxed_files
    from pst_yolo.tools.datasets import build_digits_detection

    data_yaml = build_digits_detection(workdir / "digits", train_images=1, val_images=16, imgsz=IMGSZ)
    files = sorted((data_yaml.parent / "images" / "val").iterdir())
    return data_yaml, [letterboxed_files([f], (IMGSZ, IMGSZ)) for f in files]


def litert_ops(path: Path) -> Counter:
    """Op names of the .tflite at ``path`` (``TOPK_V2``, ``QUANTIZE``, ...)."""
    from ai_edge_litert.interpreter import Interpreter

    return Counter(op["op_name"] for op in Interpreter(str(path))._get_ops_details())


@pytest.mark.parametrize("format", formats("tflite"))
def test_litert_int8_keeps_fine_attention(format, workdir, digits):
    """LiteRT static INT8 (``quantize=8``) at k=8 of a yolo11n-pst BN-calibrated on the digits: the graph is quantized
    and selects with TOPK_V2; its output lies nearer fp32 PyTorch at k=8 than at k=0 (mean |difference|, as
    tests/test_quantize.py measures ONNX and OpenVINO INT8)."""
    require(format)
    data_yaml, images = digits
    checkpoint = calibrated_checkpoint("yolo11n-pst.yaml", torch.cat(images), workdir / "digits-pst.pt")
    inputs, folder = images[:4], workdir / f"{format}-int8-k8"
    folder.mkdir()
    copy = shutil.copy(checkpoint, folder / "yolo11n-pst.pt")
    with topk_override(8), contextlib.chdir(folder):
        path = Path(YOLO(str(copy)).export(format=format, imgsz=IMGSZ, quantize=8, data=str(data_yaml)))
    ops = litert_ops(path)
    assert ops["TOPK_V2"] > 0 and ops["QUANTIZE"] > 0, ops
    int8 = [RUNTIMES[format](path, x) for x in inputs]
    fp32 = {k: [torch_output(reference_model(checkpoint, k), x) for x in inputs] for k in (0, 8)}
    to_k8, to_k0 = mean_run_diff(int8, fp32[8], IMGSZ), mean_run_diff(int8, fp32[0], IMGSZ)
    fp32_effect = mean_run_diff(fp32[8], fp32[0], IMGSZ)
    print(f"\n[int8] litert k=8: to fp32 k8 {to_k8:.2e}, to fp32 k0 {to_k0:.2e} (fp32 |k8 - k0| {fp32_effect:.2e})")
    assert to_k8 < to_k0


def coreml_ops(path: Path) -> Counter:
    """Op types of the ML program in the .mlpackage at ``path`` (every block, nested blocks included)."""
    import coremltools as ct

    ops = Counter()

    def visit(block) -> None:
        for op in block.operations:
            ops[op.type] += 1
            for nested in op.blocks:
                visit(nested)

    for function in ct.models.MLModel(str(path), skip_model_load=True).get_spec().mlProgram.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return ops


@pytest.mark.parametrize("k", [0, 8])
@pytest.mark.parametrize("format", formats("coreml"))
def test_coreml_converts_with_fine_selection(format, k, exported):
    """CoreML converts at k=0 and k=8; the k=8 program selects fine tokens (topk + gather), the k=0 one does not."""
    ops = coreml_ops(exported(format, k))
    selection = ops["topk"], sum(n for name, n in ops.items() if name.startswith("gather"))
    print(f"\n[coreml] k={k}: {sum(ops.values())} ops, topk {selection[0]}, gather* {selection[1]}")
    assert (selection[0] > 0) == (k > 0) and (selection[1] > 0) == (k > 0), ops
