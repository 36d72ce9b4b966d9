"""Export to TorchScript, OpenVINO, MNN, PaddlePaddle and NCNN through Ultralytics' own exporter, each run in its
own runtime (fp32) against PyTorch, then through Ultralytics' predictor; and NCNN's refusal of the fine attention.
Formats run at k=8 (ncnn: k=0), OpenVINO at k=0 too (see ``CASES``).

The model is the shipped ``yolo11n-pst.yaml`` with BN statistics calibrated on the two bundled images
(:func:`export_helpers.calibrated_checkpoint`), so that the fine attention moves the outputs visibly: every k=8 export
is checked against PyTorch at k=8 within ``ATOL`` *and* to differ from PyTorch at k=0 by more than ``VISIBLE``, so an
export that dropped the fine branch fails. ONNX itself is covered by tests/test_export.py. Each format's packages
come with the ``export`` extra; a test whose package is missing is skipped and says which. Every export cuts its
attention into query blocks as a 640 px export does (:func:`export_helpers.query_blocks_as_at_640`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import (
    IMAGES,
    assert_same_boxes,
    calibrated_checkpoint,
    letterboxed,
    max_abs_diff,
    openvino_output,
    query_blocks_as_at_640,
    reference_model,
    topk_override,
    torch_output,
)
from ultralytics import YOLO
from ultralytics.utils import ASSETS

from pst_yolo.tools.calibration import openvino_compile_config

pytestmark = pytest.mark.slow  # exports through the format runtimes: the full suite, not the fast tier

IMGSZ = 160  # every PSA map keeps more than k = 8 coarse tokens (P5: 5x5)
ATOL = 1e-4  # fp32; boxes in units of the input size
VISIBLE = 1e-2  # k=8 vs k=0 difference that shows the fine attention ran
BIN = Path(sys.executable).parent
FORMAT_PACKAGES = {  # import names each format's export and runtime need
    "torchscript": (),
    "openvino": ("openvino",),
    "mnn": ("onnx", "onnxslim", "MNN"),
    "paddle": ("paddle", "x2paddle"),
    "ncnn": ("ncnn", "pnnx"),
}
# Each format at k=8; at k=0 only where the converted graph differs in kind: OpenVINO fuses the k=0 attention into its
# ScaledDotProductAttention op, and ncnn refuses k > 0 (see below). Elsewhere every op of the k=0 graph is in the k=8
# graph (tests/test_export.py::test_k0_graph_ops_are_a_subset_of_k8).
PREDICT_CASES = [(f, 0 if f == "ncnn" else 8) for f in FORMAT_PACKAGES]
CASES = [*PREDICT_CASES, ("openvino", 0)]


@pytest.fixture(scope="module", autouse=True)
def query_blocks():
    """Every export of this module cuts its attention into query blocks, as exports at 640 px do."""
    with query_blocks_as_at_640():
        yield


def require(fmt: str) -> None:
    """Skip the calling test when a package of ``fmt`` does not import."""
    for name in FORMAT_PACKAGES[fmt]:
        pytest.importorskip(name, reason=f"{fmt} export needs '{name}' (pip install 'pst-yolo[export]')")


def run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    return torch_output(torch.jit.load(str(path)), x)


def run_mnn(path: Path, x: torch.Tensor) -> np.ndarray:
    import MNN

    runtime = MNN.nn.create_runtime_manager(({"precision": "high", "backend": "CPU", "numThread": 1},))
    net = MNN.nn.load_module_from_file(str(path), [], [], runtime_manager=runtime, rearrange=True)
    x = x.contiguous()
    return net.onForward([MNN.expr.const(x.data_ptr(), list(x.shape))])[0].read().copy()


def run_paddle(path: Path, x: torch.Tensor) -> np.ndarray:
    import paddle.inference as pdi

    predictor = pdi.create_predictor(pdi.Config(str(next(path.rglob("*.json"))), str(next(path.rglob("*.pdiparams")))))
    predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(x.numpy())
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def run_ncnn(path: Path, x: torch.Tensor) -> np.ndarray:
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False  # fp32
    net.opt.use_bf16_storage = False
    param = next(path.glob("*.param"))
    net.load_param(str(param))
    net.load_model(str(param.with_suffix(".bin")))
    with net.create_extractor() as extractor:
        extractor.input(net.input_names()[0], ncnn.Mat(x[0].numpy()))
        return np.array(extractor.extract(min(net.output_names()))[1])[None]


RUNTIMES = {"torchscript": run_torchscript, "openvino": openvino_output, "mnn": run_mnn, "paddle": run_paddle}
RUNTIMES["ncnn"] = run_ncnn


@pytest.fixture(scope="module", autouse=True)
def no_mnn_telemetry():
    """MNN's converter imports a telemetry logger that pip-installs aliyun-log-python-sdk (protobuf < 6, which
    breaks onnx) when it is missing, then calls home: a missing module makes MNN skip it."""
    blocked = "MNN.tools.utils.log" not in sys.modules
    if blocked:
        sys.modules["MNN.tools.utils.log"] = None
    yield
    if blocked and sys.modules.get("MNN.tools.utils.log", 0) is None:
        del sys.modules["MNN.tools.utils.log"]


@pytest.fixture(scope="module", autouse=True)
def keep_omp_threads():
    """``import paddle`` sets OMP_NUM_THREADS=1 for the process, which later tests' subprocesses would inherit."""
    before = os.environ.get("OMP_NUM_THREADS")
    yield
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_formats")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """bus.jpg letterboxed to IMGSZ as predict does: (1, 3, IMGSZ, IMGSZ)."""
    return letterboxed(IMAGES[0], (IMGSZ, IMGSZ))


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    batch = torch.cat([letterboxed(name, (IMGSZ, IMGSZ)) for name in IMAGES])
    return calibrated_checkpoint("yolo11n-pst.yaml", batch, workdir / "yolo11n-pst.pt")


@pytest.fixture(scope="module")
def references(checkpoint, image) -> dict[int, np.ndarray]:
    """fp32 PyTorch outputs on ``image`` at k=0 and k=8: (1, 84, A)."""
    return {k: torch_output(reference_model(checkpoint, k), image) for k in (0, 8)}


@pytest.fixture(scope="module")
def exported(checkpoint, workdir):
    """``exported(fmt, k)``: ``YOLO(copy).export(format=fmt)`` under top-k ``k``, once per module."""
    cache = {}

    def export(fmt: str, k: int) -> Path:
        if (fmt, k) not in cache:
            copy = shutil.copy(checkpoint, workdir / f"{checkpoint.stem}-k{k}-{fmt}.pt")
            start = time.perf_counter()
            with topk_override(k):
                cache[fmt, k] = Path(YOLO(str(copy)).export(format=fmt, imgsz=IMGSZ))
            print(f"\n[export] {fmt} k={k}: {time.perf_counter() - start:.1f} s")
        return cache[fmt, k]

    return export


@pytest.mark.parametrize("fmt, k", CASES)
def test_runtime_matches_torch(exported, references, image, fmt, k):
    """The format's own runtime gives fp32 PyTorch's output; at k=8 visibly not the k=0 one."""
    require(fmt)
    output = RUNTIMES[fmt](exported(fmt, k), image)
    assert output.shape == references[k].shape
    error = max_abs_diff(references[k], output, "detect", IMGSZ)
    fine_effect = max_abs_diff(references[0], output, "detect", IMGSZ)
    print(f"\n[parity] {fmt} k={k}: max|export - torch fp32| = {error:.2e}; vs torch k=0: {fine_effect:.2e}")
    assert error < ATOL
    if k:
        assert fine_effect > VISIBLE


@pytest.mark.parametrize("fmt, k", PREDICT_CASES)
def test_predictor_gives_torch_boxes(exported, checkpoint, fmt, k):
    """``YOLO(exported).predict(bus.jpg)`` finds the boxes ``YOLO(best.pt).predict`` finds at the same top-k.

    The calibrated random model scores every one of its 525 anchors above 0.5, so at conf 0.5 NMS and the 300-box cap
    pick among near-ties and fp32 rounding (it differs between CPUs) reorders them. At conf 0.6, 11 boxes pass at k=0
    and 35 at k=8, and no anchor's score lies within 2e-4 of the threshold. Boxes are matched by position, so two
    near-equal scores listed in the other order do not fail the test.
    """
    require(fmt)
    kwargs = {"imgsz": IMGSZ, "conf": 0.6, "rect": False, "verbose": False}  # square letterbox, as the static export
    source = str(ASSETS / IMAGES[0])
    with topk_override(k):
        ours = YOLO(str(checkpoint)).predict(source, **kwargs)[0].boxes
    # fp32 in OpenVINO too: on CPUs with native bf16 its default precision is bf16 (docs/EXPORT.md)
    f32 = openvino_compile_config(INFERENCE_PRECISION_HINT="f32") if fmt == "openvino" else contextlib.nullcontext()
    with f32:
        theirs = YOLO(str(exported(fmt, k)), task="detect").predict(source, **kwargs)[0].boxes
    assert len(ours) > 0
    assert_same_boxes(ours, theirs, xyxy_atol=0.05, conf_atol=1e-4)  # pixels of the 810x1080 image


def test_yolo_cli_exports_checkpoint_topk(checkpoint, references, image, workdir):
    """The stock ``yolo export`` command (no override: the checkpoint's own top-k, 8) gives a TorchScript file that
    runs the fine attention."""
    copy = shutil.copy(checkpoint, workdir / "cli.pt")
    cmd = [str(BIN / "yolo"), "export", f"model={copy}", "format=torchscript", f"imgsz={IMGSZ}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    output = run_torchscript(Path(copy).with_suffix(".torchscript"), image)
    assert max_abs_diff(references[8], output, "detect", IMGSZ) < ATOL
    assert max_abs_diff(references[0], output, "detect", IMGSZ) > VISIBLE


def test_ncnn_refuses_fine_attention(checkpoint, workdir):
    """``yolo export format=ncnn`` of a model with top-k > 0 fails before pnnx and says how to export top-k 0 (ncnn has
    no TopK/Gather layers: pnnx would drop the fine branch and report success)."""
    copy = shutil.copy(checkpoint, workdir / "ncnn-refused.pt")
    cmd = [str(BIN / "yolo"), "export", f"model={copy}", "format=ncnn", f"imgsz={IMGSZ}"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert result.returncode != 0
    assert "NCNN export cannot carry PST's fine attention (top-k 8" in result.stderr + result.stdout
    assert "topk=0" in result.stderr + result.stdout
    assert not (workdir / "ncnn-refused_ncnn_model" / "model.ncnn.bin").exists()
