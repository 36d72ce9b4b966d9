"""Export of PST models: ONNX graphs and onnxruntime parity, TensorRT checks, TorchScript (through the real CLI:
tests/test_end_to_end.py).

Models are the shipped ``yolo11n-pst.yaml`` (detection) and ``yolo11n-cls-pst.yaml`` (classification) with every
conv re-initialised and their BatchNorm statistics (fine K/V statistics included) calibrated on Ultralytics' two
bundled images, then saved as checkpoints with ``YOLO.save``: activations are O(1) and the fine attention changes
the outputs (asserted), so parity checks see the fine branch. Exports go through Ultralytics' own exporter with the
process-wide top-k override the ``pst-yolo ... topk=K`` CLI uses; references are the fused eval PyTorch model.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import (
    IMAGES,
    assert_same_boxes,
    assert_standard_graph,
    calibrated_checkpoint,
    letterboxed,
    max_abs_diff,
    ort_output,
    reference_model,
    topk_override,
    torch_output,
)
from ultralytics import YOLO
from ultralytics.nn.modules import Detect
from ultralytics.utils import ASSETS

from pst_yolo import PST, set_topk
from pst_yolo.ops import backends, export_compat
from pst_yolo.ops.pyramid_sparse_attention import blocked_attention_with_scores
from pst_yolo.tools.tensorrt_check import check_tensorrt_compatible

pytestmark = pytest.mark.slow  # exports through the format runtimes: the full suite, not the fast tier

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

IMGSZ = 320
CLS_IMGSZ = 224
ATOL = 1e-4  # fp32; detection boxes are compared in units of the input size (pixels / max(H, W))


def assert_matches_torch(checkpoint: Path, k: int, x: torch.Tensor, exported: np.ndarray, task: str, label: str):
    """The exported output matches fp32 PyTorch within ``ATOL`` and is as close to an fp64 PyTorch reference as fp32
    PyTorch is (flash-attention's rule: at most twice its error, plus 1e-6). Prints the numbers (``pytest -s``) that
    docs/EXPORT.md reports.
    """
    size = max(x.shape[2:])
    fp32 = torch_output(reference_model(checkpoint, k), x)
    fp64 = torch_output(reference_model(checkpoint, k).double(), x.double())
    torch_error, export_error = max_abs_diff(fp64, fp32, task, size), max_abs_diff(fp64, exported, task, size)
    vs_fp32 = max_abs_diff(fp32, exported, task, size)
    print(
        f"\n[parity] {label} k={k} {tuple(x.shape)}: max|export - torch fp32| = {vs_fp32:.2e}; vs fp64: export "
        f"{export_error:.2e}, torch fp32 {torch_error:.2e}"
    )
    assert vs_fp32 < ATOL
    assert export_error <= 2 * torch_error + 1e-6, (export_error, torch_error)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def detect_images() -> dict[tuple[int, int], torch.Tensor]:
    """Both bundled images letterboxed to each tested size, as a (2, 3, H, W) batch per size."""
    return {hw: torch.cat([letterboxed(n, hw) for n in IMAGES]) for hw in ((IMGSZ, IMGSZ), (352, 288))}


@pytest.fixture(scope="module")
def detect_pt(workdir, detect_images) -> Path:
    return calibrated_checkpoint("yolo11n-pst.yaml", detect_images[(IMGSZ, IMGSZ)], workdir / "yolo11n-pst.pt")


@pytest.fixture(scope="module")
def cls_batch() -> torch.Tensor:
    return torch.cat([letterboxed(n, (CLS_IMGSZ, CLS_IMGSZ)) for n in IMAGES])


@pytest.fixture(scope="module")
def cls_pt(workdir, cls_batch) -> Path:
    return calibrated_checkpoint("yolo11n-cls-pst.yaml", cls_batch, workdir / "yolo11n-cls-pst.pt")


@pytest.fixture(scope="module")
def exported(workdir):
    """``exported(checkpoint, k, format=..., **kwargs)``: export once per argument set (cached for the module)."""
    cache = {}

    def export(checkpoint: Path, k: int, format: str = "onnx", **kwargs) -> Path:
        key = (checkpoint.name, k, format, tuple(sorted(kwargs.items())))
        if key not in cache:
            tag = "-".join(f"{name}{value}" for name, value in sorted(kwargs.items()))
            copy = shutil.copy(checkpoint, workdir / f"{checkpoint.stem}-k{k}-{format}-{tag}.pt")
            with topk_override(k):
                cache[key] = Path(YOLO(str(copy)).export(format=format, **kwargs))
        return cache[key]

    return export


def test_fine_attention_changes_outputs(detect_pt, detect_images):
    model = reference_model(detect_pt, 0)
    x = detect_images[(IMGSZ, IMGSZ)]
    coarse = torch_output(model, x)
    set_topk(model, 8)
    assert max_abs_diff(coarse, torch_output(model, x), "detect", IMGSZ) > 1e-2


# Ops that some converter of Ultralytics' exporter lacks or mistranslates (docs/EXPORT.md, "Portable graph"):
# x2paddle maps SDPA onto Paddle's (B, L, h, d) layout, has no unbind/any/ones_like and converts gather with a float
# index; CoreML has no new_ones; zeros_like without a dtype, masked_fill and where on a bool mask fail in x2paddle.
NON_PORTABLE_OPS = {
    "aten::scaled_dot_product_attention",
    "aten::unbind",
    "aten::new_ones",
    "aten::ones_like",
    "aten::any",
    "aten::zeros_like",
    "aten::gather",
    "aten::masked_fill",
    "aten::where",
}


@pytest.mark.parametrize("k", [0, 8])
def test_traced_graph_is_portable(detect_pt, detect_images, k):
    """The TorchScript graph that every converter reads (Ultralytics traces the model for TorchScript, ncnn, CoreML
    and PaddlePaddle) has no non-portable op from pst_yolo's code, selects with topk and row indexing at k > 0,
    and runs as eager."""
    model = reference_model(detect_pt, k)
    for m in model.modules():
        if isinstance(m, Detect):
            m.export = True  # as Ultralytics' exporter sets: one output tensor
    x = detect_images[(IMGSZ, IMGSZ)][:1]
    traced = torch.jit.trace(model, x, strict=False, check_trace=False)
    nodes = list(traced.inlined_graph.nodes())
    kinds = Counter(node.kind() for node in nodes)
    ours = {node.kind() for node in nodes if "pst_yolo" in node.sourceRange()}  # stock blocks use // on shapes
    assert ours and not NON_PORTABLE_OPS & ours, NON_PORTABLE_OPS & ours
    assert (kinds["aten::topk"] > 0) == (k > 0), kinds["aten::topk"]
    assert (kinds["aten::index"] > 0) == (k > 0)  # the selected fine-map tokens, as rows of the flattened map
    assert max_abs_diff(torch_output(model, x), torch_output(traced, x), "detect", IMGSZ) < 1e-5


@pytest.mark.parametrize("k", [0, 8])
@pytest.mark.parametrize("dynamic, simplify", [(False, True), (True, True), (True, False)])
def test_detect_onnx_graph(detect_pt, exported, k, dynamic, simplify):
    assert_standard_graph(exported(detect_pt, k, imgsz=IMGSZ, dynamic=dynamic, simplify=simplify), k)


@pytest.mark.parametrize("k", [0, 8])
def test_detect_onnx_matches_torch(detect_pt, detect_images, exported, k):
    path = exported(detect_pt, k, imgsz=IMGSZ, dynamic=False, simplify=True)
    for x in detect_images[(IMGSZ, IMGSZ)].split(1):  # the static graph has batch 1
        assert_matches_torch(detect_pt, k, x, ort_output(path, x), "detect", "ONNX static detect")


@pytest.mark.parametrize("k", [0, 8])
def test_detect_dynamic_onnx_matches_torch(detect_pt, detect_images, exported, k):
    """One dynamic graph at 320x320 and at 352x288 (not multiples of 64), batch 2."""
    path = exported(detect_pt, k, imgsz=IMGSZ, dynamic=True, simplify=True)
    for x in detect_images.values():
        assert_matches_torch(detect_pt, k, x, ort_output(path, x), "detect", "ONNX dynamic detect")


def test_onnxslim_without_onnxruntime_folding_keeps_the_graph_right(detect_pt, detect_images, exported, monkeypatch):
    """onnxslim folds constant subgraphs through ONNX Runtime and falls back to its own folding where a session fails
    (no onnxruntime, or a process with ONNX Runtime's global thread pool). The k=8 graph must stay right either way:
    an ``F.pad`` of the eq. 3 scores exported as a reversed Slice, which that fallback folded wrongly (padding
    first), gave outputs off by 0.17."""
    onnxslim = pytest.importorskip("onnxslim")
    unsimplified = exported(detect_pt, 8, imgsz=IMGSZ, dynamic=False, simplify=False)  # static: shapes fold

    def no_session(*args, **kwargs):
        raise RuntimeError("no ONNX Runtime session in this test")

    with monkeypatch.context() as patch:
        patch.setattr(ort, "InferenceSession", no_session)
        slimmed = onnxslim.slim(onnx.load(str(unsimplified)))
    path = unsimplified.with_name("yolo11n-pst-k8-slimmed-without-ort.onnx")
    onnx.save(slimmed, str(path))
    for x in detect_images[(IMGSZ, IMGSZ)].split(1):  # the static graph has batch 1
        assert_matches_torch(detect_pt, 8, x, ort_output(path, x), "detect", "ONNX slimmed without ORT folding")


def test_dynamic_onnx_k_independent_of_export_size(detect_pt, exported):
    """A dynamic graph exported at 64 px (upper P5 map: 2x2 < k tokens) keeps k = 8 and runs at 64 and 320 px."""
    path = exported(detect_pt, 8, imgsz=64, dynamic=True, simplify=True)
    for hw in ((64, 64), (IMGSZ, IMGSZ)):
        x = letterboxed("bus.jpg", hw)
        assert_matches_torch(detect_pt, 8, x, ort_output(path, x), "detect", "ONNX dynamic (exported at 64) detect")


@pytest.mark.parametrize("k", [0, 8])
def test_query_blocks_onnx_matches_torch(detect_pt, detect_images, workdir, monkeypatch, k):
    """Attention cut into query blocks in the traced graph (export_compat.traced_query_blocks): at 320 px the P3 layer's
    640K logits exceed a 2^17 block 5 times, so its graph holds 5 Softmax chains (one more at k = 8: the fine
    attention); the dynamic graph matches PyTorch at 320x320 and 352x288, batch 2, as the one-block graph does."""
    monkeypatch.setattr(export_compat, "TRACED_BLOCK_ELEMENTS", 1 << 17)
    copy = shutil.copy(detect_pt, workdir / f"{detect_pt.stem}-k{k}-blocks.pt")
    with topk_override(k):
        path = YOLO(str(copy)).export(format="onnx", imgsz=IMGSZ, dynamic=True, simplify=True)
    assert_standard_graph(path, k)
    softmax = Counter(n.name.rsplit("/", 1)[0] for n in onnx.load(path).graph.node if n.op_type == "Softmax")
    assert softmax["/model.14/blocks.0/attn"] == 5 + (k > 0), softmax
    assert_blocks_run_one_by_one(path, "/model.14/blocks.0/attn/", workdir / f"k{k}-ort-optimized.onnx")
    for x in detect_images.values():
        assert_matches_torch(detect_pt, k, x, ort_output(path, x), "detect", "ONNX dynamic detect, query blocks")


def assert_blocks_run_one_by_one(path: str, scope: str, optimized: Path) -> None:
    """In the order ONNX Runtime runs the graph (its optimized graph, saved), everything that reads a block's softmax
    (``p v``; at k > 0 the eq. 3 key sums too) runs before the next block's softmax, so each block is used while in
    cache. Without the key sums' dependency on ``p v`` ORT ran every block's key sums first and all ``p v`` last."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    nodes = list(onnx.load(str(optimized)).graph.node)
    softmaxes = [i for i, n in enumerate(nodes) if n.op_type == "Softmax" and n.name.startswith(scope)]
    for this, following in zip(softmaxes, [*softmaxes[1:], len(nodes)]):
        readers = [i for i, n in enumerate(nodes) if nodes[this].output[0] in n.input]
        assert readers and max(readers) < following, [(nodes[i].op_type, nodes[i].name) for i in readers]


def test_query_blocks_at_every_size(tmp_path, monkeypatch):
    """One traced graph in 4 query blocks (the count fixed at the traced 40x40 over 20x20) runs right at any token
    count: larger than traced, and small enough that some blocks are empty; eq. 2 and eq. 3 (scores) both."""
    monkeypatch.setattr(export_compat, "TRACED_BLOCK_ELEMENTS", 2 * 2 * 1600 * 400 // 4)  # B * h * N * M of the trace

    class CoarsePass(torch.nn.Module):
        def forward(self, q, k, v):
            out, scores = blocked_attention_with_scores(q, k, v)
            return out, scores, backends.attention(q, k, v, "sdpa")[0]

    def inputs(n: int, m: int):
        g = torch.Generator().manual_seed(n)
        return tuple(torch.randn(2, 2, size, 32, generator=g) for size in (n, m, m))

    path = tmp_path / "blocks.onnx"
    axes = {"q": {2: "n"}, "k": {2: "m"}, "v": {2: "m"}}
    torch.onnx.export(
        CoarsePass(), inputs(1600, 400), str(path), opset_version=18, dynamo=False, input_names=["q", "k", "v"],
        output_names=["out", "scores", "dense"], dynamic_axes=axes,
    )  # fmt: skip
    assert Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Softmax"] == 8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, m in ((1600, 400), (2500, 625), (6, 4), (1, 1)):  # at n = 6 blocks of 2 rows: the last one is empty
        q, k, v = inputs(n, m)
        out, scores, dense = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 32**0.5, dim=-1)
        np.testing.assert_allclose(out, (probs @ v.double()).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(dense, (probs @ v.double()).numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores, probs.mean(dim=2).numpy(), atol=1e-6, rtol=0)


def test_predict_onnx_gives_pt_boxes(detect_pt, exported):
    """``YOLO(best.onnx).predict`` (dynamic graph, rectangular letterbox) finds the boxes ``YOLO(best.pt)`` finds.

    The calibrated random model scores 738 of bus.jpg's 2100 anchors above 0.6, so at conf 0.6 NMS and the 300-box cap
    pick among near-ties, whose order fp32 rounding decides. At conf 0.75, 14 boxes pass and no anchor's score lies
    within 8e-4 of the threshold; boxes are matched by position.
    """
    path = exported(detect_pt, 8, imgsz=IMGSZ, dynamic=True, simplify=True)
    sources = [str(ASSETS / n) for n in IMAGES]
    kwargs = {"imgsz": IMGSZ, "conf": 0.75, "verbose": False}
    onnx_model = YOLO(str(path), task="detect")
    results = zip(YOLO(str(detect_pt)).predict(sources, **kwargs), onnx_model.predict(sources, **kwargs))
    found = 0
    for ours, theirs in results:
        found += len(ours.boxes)
        assert_same_boxes(ours.boxes, theirs.boxes, xyxy_atol=0.01, conf_atol=1e-5)  # pixels
    assert found > 0


@pytest.mark.parametrize("k", [0, 8])
def test_classify_onnx_graph_and_parity(cls_pt, cls_batch, exported, k):
    path = exported(cls_pt, k, imgsz=CLS_IMGSZ, dynamic=True, simplify=True)
    assert_standard_graph(path, k)
    assert_matches_torch(cls_pt, k, cls_batch, ort_output(path, cls_batch), "classify", "ONNX dynamic classify")


def test_classify_fine_attention_changes_outputs(cls_pt, cls_batch):
    model = reference_model(cls_pt, 0)
    coarse = torch_output(model, cls_batch)
    set_topk(model, 8)
    assert max_abs_diff(coarse, torch_output(model, cls_batch), "classify", CLS_IMGSZ) > 1e-2


@pytest.mark.slow
def test_half_onnx_on_cpu(detect_pt, detect_images, exported):
    """``half=True`` on CPU: Ultralytics 8.4 converts the fp32 graph to fp16 inside, fp32 inputs and outputs."""
    path = exported(detect_pt, 8, imgsz=IMGSZ, half=True)
    graph = onnx.load(str(path)).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert_standard_graph(path, 8)
    model = reference_model(detect_pt, 8)
    x = detect_images[(IMGSZ, IMGSZ)][:1]
    diff = max_abs_diff(torch_output(model, x), ort_output(path, x), "detect", IMGSZ)
    print(f"\n[parity] ONNX fp16 (half=True on CPU) detect k=8 {tuple(x.shape)}: max|export - torch fp32| = {diff:.2e}")
    assert diff < 1e-2


class PSTBlock(torch.nn.Module):
    """A PST neck row as a two-input module, ``(x, kv) -> y``, for exporters that take positional tensors."""

    def __init__(self, block: PST):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.block([x, kv])


def pst_row_and_inputs(checkpoint: Path, images: dict) -> tuple[PST, list[list[torch.Tensor]]]:
    """The first PST row (P4 queries, P5 K/V) of the eval model at k=8, and its inputs per tested size: [x (2, C, H,
    W), kv (2, C', H/2, W/2)] on the bundled images."""
    model = reference_model(checkpoint, 8)
    row = next(m for m in model.modules() if isinstance(m, PST))
    inputs = []
    hook = row.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in images.values():
            model(batch)
    hook.remove()
    return row, inputs


@pytest.mark.parametrize("block_elements", [None, 1 << 13], ids=["one-block", "query-blocks"])
def test_k0_graph_ops_are_a_subset_of_k8(detect_pt, detect_images, monkeypatch, block_elements):
    """Every op a PST row's k=0 graph holds, its k=8 graph holds too, in each form a converter reads: the ONNX graph
    (ONNX Runtime, TensorRT, MNN, onnx2tf for SavedModel), the TorchScript trace (TorchScript, PaddlePaddle, CoreML,
    ncnn) and ``torch.export`` (LiteRT); with the attention in one block and cut into query blocks (as at 640 px and
    in the converter tests, :func:`export_helpers.query_blocks_as_at_640`). So a converter that handles the k=8 graph
    meets nothing new at k=0, and the slowest converters (onnx2tf, LiteRT, x2paddle) are tested at k=8 only."""
    if block_elements:
        monkeypatch.setattr(export_compat, "TRACED_BLOCK_ELEMENTS", block_elements)
    square = (IMGSZ, IMGSZ)  # one size is enough for op types
    row, (inputs,) = pst_row_and_inputs(detect_pt, {square: detect_images[square]})
    block, args = PSTBlock(row).eval(), tuple(t[:1] for t in inputs)

    def onnx_ops() -> Counter:
        buffer = io.BytesIO()
        torch.onnx.export(block, args, buffer, opset_version=18, dynamo=False)
        return Counter(node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node)

    def traced_ops() -> Counter:
        return Counter(node.kind() for node in torch.jit.trace(block, args, check_trace=False).inlined_graph.nodes())

    def exported_ops() -> Counter:
        program = torch.export.export(block, args).run_decompositions()
        return Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")

    for form, ops in (("ONNX", onnx_ops), ("TorchScript", traced_ops), ("torch.export", exported_ops)):
        with torch.no_grad():
            set_topk(row, 0)
            coarse = ops()
            set_topk(row, 8)
            fine = ops()
        print(f"\n[ops] {form}: k=0 {len(coarse)} op types, k=8 {len(fine)}")
        assert set(coarse) < set(fine), (form, set(coarse) - set(fine))  # k=8 adds the selection and the gather
        if form == "ONNX":
            assert (coarse["Softmax"] > 1) == bool(block_elements), coarse["Softmax"]


def test_dynamo_onnx_export(detect_pt, detect_images, workdir):
    """torch.onnx.export(dynamo=True) of a PST row with dynamic H and W: the exporter Ultralytics 8.3.x picked on
    torch >= 2.9 (8.4 never does; users may call it themselves). The row (P4 queries, P5 K/V) of the calibrated
    detector, on its inputs from both bundled images at both sizes: a standard graph, ONNX Runtime equal to PyTorch,
    and k=8 visibly unlike k=0. The Ultralytics modules around it are its exporter's concern (55 s for the whole
    model, 8 s for the row)."""
    pytest.importorskip("onnxscript")
    row, inputs = pst_row_and_inputs(detect_pt, detect_images)
    block, path = PSTBlock(row), workdir / "dynamo-pst-row-k8.onnx"
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    torch.onnx.export(
        block, tuple(t[:1] for t in inputs[0]), str(path), dynamo=True, opset_version=18, input_names=["x", "kv"],
        dynamic_shapes={"x": {2: 2 * h, 3: 2 * w}, "kv": {2: h, 3: w}},
    )  # fmt: skip
    assert_standard_graph(path, 8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x, kv in inputs:
        for i in range(len(x)):
            with torch.no_grad():
                fine = block(x[i : i + 1], kv[i : i + 1])
                set_topk(row, 0)
                coarse = block(x[i : i + 1], kv[i : i + 1])
                set_topk(row, 8)
            (exported,) = session.run(None, {"x": x[i : i + 1].numpy(), "kv": kv[i : i + 1].numpy()})
            error, moved = np.abs(exported - fine.numpy()).max(), (fine - coarse).abs().max().item()
            print(f"\n[parity] dynamo PST row {tuple(x.shape[2:])}: max error {error:.1e}, k=8 vs k=0 {moved:.1e}")
            assert error < ATOL and moved > 1e-2 * fine.abs().max().item()


def _tiny_graph(nodes, initializers, opset: int = 18, domain_opsets=()) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    y = onnx.helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(nodes, "tiny", [x], [y], initializers)
    opsets = [onnx.helper.make_opsetid("", opset), *(onnx.helper.make_opsetid(d, 1) for d in domain_opsets)]
    path = Path(tempfile.mkdtemp()) / "tiny.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_tensorrt_check_accepts_tiny_topk_graph():
    k = onnx.numpy_helper.from_array(np.array([8], dtype=np.int64), "k")
    nodes = [onnx.helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)]
    assert check_tensorrt_compatible(_tiny_graph(nodes, [k])) == []


def test_tensorrt_check_flags_bad_graph():
    k = onnx.numpy_helper.from_array(np.array([5000], dtype=np.int64), "k")
    nodes = [
        onnx.helper.make_node("RandomNormalLike", ["x"], ["noise"]),
        onnx.helper.make_node("TopK", ["noise", "k"], ["values", "indices"], axis=-1, sorted=0),
        onnx.helper.make_node("Shape", ["values"], ["axes"]),
        onnx.helper.make_node("ReduceSum", ["values", "axes"], ["summed"]),
        onnx.helper.make_node("Resize", ["summed", "", "", ""], ["resized"], mode="cubic"),
        onnx.helper.make_node("Det", ["resized"], ["det"]),
        onnx.helper.make_node("Gumbel", ["det"], ["out"], domain="custom.ops"),
    ]
    problems = check_tensorrt_compatible(_tiny_graph(nodes, [k], opset=21, domain_opsets=["custom.ops"]))
    for expected in ("opset 21", "custom operator domain", "random operator", "sorted must be 1", "K = 5000",
                     "ReduceSum", "mode 'cubic'", "Det node", "custom domain 'custom.ops'"):  # fmt: skip
        assert any(expected in p for p in problems), (expected, problems)


@pytest.mark.gpu
def test_tensorrt_engine_matches_torch(detect_pt, detect_images, exported):
    """``format=engine`` (TensorRT) vs the PyTorch model on the GPU, fp32 engine, k = 8. Untested without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engine export needs a CUDA GPU; none is available")
    pytest.importorskip("tensorrt", reason="TensorRT Python package (tensorrt) is not installed")
    from ultralytics.nn.autobackend import AutoBackend

    path = exported(detect_pt, 8, format="engine", imgsz=IMGSZ, device=0)
    assert check_tensorrt_compatible(path.with_suffix(".onnx")) == []
    engine = AutoBackend(str(path), device=torch.device("cuda:0"))
    model = reference_model(detect_pt, 8).cuda()
    for x in detect_images[(IMGSZ, IMGSZ)].split(1):
        x = x.cuda()
        with torch.no_grad():
            ours, theirs = model(x), engine(x)
        ours, theirs = (y[0] if isinstance(y, (list, tuple)) else y for y in (ours, theirs))
        assert max_abs_diff(ours.cpu().numpy(), theirs.cpu().numpy(), "detect", IMGSZ) < 1e-2  # TF32 in TensorRT
