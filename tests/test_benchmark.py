"""``pst-yolo bench``: its measuring tools, and a smoke run of every section with tiny settings (nothing timed)."""

import json
import subprocess
import sys

import pytest
import torch

from pst_yolo.ops import coarse_attention_with_scores
from pst_yolo.tools.bench import main
from pst_yolo.tools.bench.op import op_flops
from pst_yolo.tools.bench.timing import peak_memory_mb, time_round_robin

CPU = torch.device("cpu")


def test_round_robin_interleaves_variants_after_warmup():
    calls = []
    medians = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 2, CPU)
    assert calls == ["a", "b"] * 5
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def test_cpu_peak_memory_counts_live_tensors_only():
    def allocate():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB, 12 MB live
        del a
        c = torch.empty(500_000)  # 2 MB after a was freed: 10 MB live
        return b, c

    assert peak_memory_mb(allocate, CPU) == pytest.approx(12e6 / 2**20)


def test_cpu_peak_memory_ignores_views_and_in_place_updates_of_inputs():
    x = torch.zeros(1_000_000)
    assert peak_memory_mb(lambda: (x.add_(1), x[10:].view(-1, 10), x.t()), CPU) == 0


def test_score_step_never_holds_the_dense_matrix():
    """At 80x80 queries over 40x40 keys the N x M probabilities are 41 MB; the score step stays far below."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 6400, 32, generator=g)
    k, v = torch.randn(1, 1, 1600, 32, generator=g), torch.randn(1, 1, 1600, 32, generator=g)
    dense_mb = 6400 * 1600 * 4 / 2**20
    with torch.inference_mode():
        for backend in ("naive", "sdpa"):
            peak = peak_memory_mb(lambda b=backend: coarse_attention_with_scores(q, k, v, b), CPU)
            assert peak < dense_mb / 8, backend


def test_op_flops_counts_coarse_score_and_fine_matmuls():
    n, m, d = 6400, 1600, 32
    assert op_flops(1, 1, n, m, 0) == 4 * n * m * d
    assert op_flops(2, 1, n, m, 8) == 2 * (4 * n * m * d + 2 * n * m * d + 4 * n * 32 * d)
    assert op_flops(1, 1, 16, 4, 100) == op_flops(1, 1, 16, 4, 4)  # top-k is capped at M


@pytest.mark.slow
def test_quick_run_writes_every_table(tmp_path):
    threads = torch.get_num_threads()
    try:
        results = main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) == set(results) == {"machine", "imgsz", "args", "gemm", "op", "score_step", "models", "train"}
    assert saved["machine"]["torch"] == torch.__version__ and saved["gemm"]["gflops"] > 0
    assert {r["backend"] for r in saved["op"]} >= {"bare sdpa", "naive", "sdpa"}
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in saved["op"])
    labels = {"yolo12n", "yolo11n-pst k=0", "yolo11n-pst k=8", "yolo11n-pst k=8 naive"}
    assert {r["model"] for r in saved["models"] if r["runtime"] == "pytorch"} == labels
    assert {r["model"] for r in saved["train"]} == {"yolo12n", "yolo11n-pst"}
    # the PSA attention nodes in ONNX Runtime's profile, the parts of PST's layers in training
    (ort_k0,) = [r for r in saved["models"] if r["runtime"] == "onnxruntime" and r["model"] == "yolo11n-pst k=0"]
    assert 0 < ort_k0["attention_ms"] < ort_k0["ms"]
    train = {r["model"]: r for r in saved["train"]}
    pst_train = train["yolo11n-pst"]
    assert 0 < pst_train["attention_ms"] < pst_train["ms"] and 0 < pst_train["convs_ms"] < pst_train["ms"]
    assert 0 < pst_train["replaced_layers_ms"] < pst_train["ms"]
    assert train["yolo12n"]["attention_ms"] is None and train["yolo12n"]["convs_ms"] is None
    assert 0 < pst_train["conv_kernels_ms"] < pst_train["ms"]  # PST's kernels' throughput, beside a GEMM's
    assert all(pst_train[key] > 0 for key in ("conv_gflops", "attention_gflops", "gemm_gflops"))
    assert all(train["yolo12n"][key] is None for key in ("conv_kernels_ms", "conv_gflops", "gemm_gflops"))
    assert train["yolo12n"]["replaced_layers"] == pst_train["replaced_layers"] == "11, 14"
    assert 0 < train["yolo12n"]["replaced_layers_ms"] < train["yolo12n"]["ms"]
    assert all(r["page_faults"] is None or r["page_faults"] >= 0 for r in train.values())
    for r in saved["train"]:  # the trainer's accumulate = round(nbs 64 / batch 2): one optimizer step per 32
        assert r["accumulate"] == 32 and r["ms"] == pytest.approx(r["forward_backward_ms"] + r["optimizer_ms"] / 32)
    assert saved["score_step"][0]["variant"] == "dense N x M softmax"
    report = (tmp_path / "bench.md").read_text()
    assert "### PSA op" in report and "### Training iteration" in report and "yolo11n-pst k=8" in report
    assert (tmp_path / "bench.png").stat().st_size > 0
    # the shared ONNX Runtime pool lives in the timing process only: here a plain session (as onnxslim's constant
    # folding makes during an export) still works
    ort = pytest.importorskip("onnxruntime")
    graph = tmp_path / "relu.onnx"
    torch.onnx.export(torch.nn.ReLU(), torch.zeros(1, 2), str(graph), dynamo=False)
    ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_onnx_timing_sessions_share_one_thread_pool_per_process():
    """Timed ONNX sessions share their process's one pool (own pools slowed each other round-robin); a process asked
    for a second pool size fails with a clear error instead of timing with the first size."""
    pytest.importorskip("onnxruntime")
    code = (
        "from pst_yolo.tools.bench.onnx_runtime import onnx_session_options\n"
        "assert not onnx_session_options(1).use_per_session_threads\n"
        "onnx_session_options(1)\n"
        "onnx_session_options(2)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "RuntimeError" in result.stderr, result.stderr
    assert "in a fresh process" in result.stderr.splitlines()[-1], result.stderr


def test_cli_dispatches_bench():
    result = subprocess.run([sys.executable, "-m", "pst_yolo", "bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--model-batches" in result.stdout


@pytest.mark.slow
def test_training_flops_count_each_conv_and_attention_product():
    """Conv FLOPs against torch's own counter (1x1 convs) and a hand count (depthwise: the counter's backward ignores
    groups); attention: q k^T and p v forward, four products backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from ultralytics.nn.tasks import DetectionModel

    from pst_yolo.nn import PST
    from pst_yolo.tools.bench.train import (
        attention_training_flops,
        conv_training_flops,
        forward_recording,
        psa_attention_shapes,
    )

    model = DetectionModel("yolo11n-pst.yaml", verbose=False).train()
    images = torch.rand(2, 3, 64, 64)
    rows = [m.i for m in model.model if isinstance(m, PST)]
    inputs = {}
    convs = [m for i in rows for m in model.model[i].modules() if isinstance(m, torch.nn.Conv2d)]
    forward_recording(
        model, images, [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0])) for m in convs]
    )
    expected = 0
    for conv in convs:
        x = inputs[conv].clone().requires_grad_()
        if conv.groups == 1:
            with FlopCounterMode(display=False) as counter:
                conv(x).sum().backward()
            expected += counter.get_total_flops()
        else:  # depthwise 7x7: 2 MACs per output element and tap, three times (forward, input and weight gradients)
            expected += 3 * 2 * conv(x).numel() * 49
    assert any(conv.groups > 1 for conv in convs)
    assert conv_training_flops(model, images, rows) == expected
    shapes = psa_attention_shapes(model, images)
    assert shapes == [(2, 2, 16, 4, 32), (2, 1, 64, 16, 32)]  # P4 4x4 over 2x2, P3 8x8 over 4x4
    assert attention_training_flops(shapes) == 12 * 32 * (2 * 2 * 16 * 4 + 2 * 1 * 64 * 16)
