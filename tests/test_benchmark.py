"""Benchmark suite: its measuring tools, and a smoke run of every section with tiny settings (no timed assertions)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pst_yolo.tools.benchmark import (
    main,
    median_over_rounds,
    op_flops,
    peak_memory_mb,
    ratio_of,
    target,
    time_round_robin,
    time_rounds,
    verdict_text,
)
from pst_yolo.ops import coarse_attention_with_scores

CPU = torch.device("cpu")


def test_round_robin_interleaves_variants_after_warmup():
    calls = []
    medians = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 2, CPU)
    assert calls == ["a", "b"] * 5
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


def test_ratios_within_rounds():
    """time_rounds keeps every round; median_over_rounds takes a ratio within each round, then the median: a slow
    stretch spanning a round (every call of round 2 ten times slower) leaves it at 2, where the medians would not."""
    rounds = time_rounds({"a": lambda: None, "b": lambda: None}, 3, 1, CPU)
    assert set(rounds) == {"a", "b"} and all(len(t) == 3 for t in rounds.values())
    slow_round = {"a": [1.0, 10.0, 1.0, 10.0], "b": [2.0, 20.0, 2.0, 20.0], "c": [0.0, 0.0, 0.0, 0.0]}
    assert median_over_rounds(slow_round, ratio_of("b", "a")) == 2.0
    uneven = {"a": [1.0, 1.0, 10.0], "b": [3.0, 20.0, 20.0]}
    assert median_over_rounds(uneven, ratio_of("b", "a")) == 3.0  # ratios 3, 20, 2


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
            assert peak_memory_mb(lambda: coarse_attention_with_scores(q, k, v, backend), CPU) < dense_mb / 8, backend


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
    assert saved["machine"]["torch"] == torch.__version__ and saved["gemm"]["gflops"] > 0
    assert {r["backend"] for r in saved["op"]} >= {"bare sdpa", "naive", "sdpa"}
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in saved["op"])
    labels = {"yolo12n", "yolo11n-pst k=0", "yolo11n-pst k=8", "yolo11n-pst k=8 naive"}
    assert {r["model"] for r in saved["models"] if r["runtime"] == "pytorch"} == labels
    assert {r["model"] for r in saved["train"]} == {"yolo12n", "yolo11n-pst"}
    # the bounds' inputs: the PSA attention nodes in ONNX Runtime's profile, the attention kernel in training
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
    bounds = [t for t in saved["targets"] if t["name"].startswith(("bound of", "ceiling of"))]
    assert len(bounds) == 7 and all(t["value"] > 0 for t in bounds), bounds
    for r in saved["train"]:  # the trainer's accumulate = round(nbs 64 / batch 2): one optimizer step per 32
        assert r["accumulate"] == 32 and r["ms"] == pytest.approx(r["forward_backward_ms"] + r["optimizer_ms"] / 32)
    assert len(saved["targets"]) == len(results["targets"])
    assert saved["score_step"][0]["variant"] == "dense N x M softmax"
    report = (tmp_path / "bench.md").read_text()
    assert "### Targets and ratios" in report and "yolo11n-pst k=8" in report
    assert len(saved["train_processes"]) == 1 and "each process the training section ran in" in report
    (run,) = saved["model_processes"]  # --quick: the target models in this process
    ratio_names = {f"{rt} {r}" for rt in ("pytorch", "onnxruntime") for r in ("k=0 / YOLO12n", "k=8 / k=0")}
    ratio_names.add("pytorch op k=8 / bare SDPA")
    assert set(run["ratios"]) == ratio_names | {f"{r} bound" for r in ratio_names}
    assert all(value > 0 for value in run["ratios"].values())
    assert "each of the 1 processes the target models ran in" in report
    by_name = {t["name"]: t for t in saved["targets"]}
    fine_ort = by_name["fine attention: YOLO11n-PST k=8 / k=0 latency (ONNX Runtime)"]
    assert fine_ort["value"] == run["ratios"]["onnxruntime k=8 / k=0"]
    assert fine_ort["bound"] == run["ratios"]["onnxruntime k=8 / k=0 bound"] > 1, "the key sums and fine attention"
    assert fine_ort["from_bound"] == pytest.approx(fine_ort["value"] - fine_ort["bound"])
    (train_run,) = saved["train_processes"]  # the training ratio and ceiling, taken within rounds in this process
    training = by_name["train step throughput YOLO11n-PST / YOLO12n"]
    assert training["value"] == train_run["ratio"] > 0 and training["bound"] == train_run["ceiling"] > 0
    assert {r["pid"] for r in saved["train"]} == {train_run["pid"]}
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_verdict_places_the_ratio_against_its_bound():
    """Met, beyond its bound (spread), unreachable (bound past the target) or short of a bound within the target."""
    assert verdict_text(target("x", 1.01, "<=", 1.03)) == "met" and verdict_text(target("d", 1.2)) == "-"
    assert verdict_text(target("x", 1.02, "<=", 1.03, 1.01, 0.01)) == "met"
    assert verdict_text(target("x", 1.01, "<=", 1.03, 1.06, -0.05)) == (
        "met; 0.050 beyond its bound 1.060, so within the spread"
    )
    assert verdict_text(target("x", 1.07, "<=", 1.03, 1.06, 0.01)) == (
        "NOT met; unreachable: its bound 1.060 is past the target; the code 0.010 from its bound 1.060"
    )
    assert verdict_text(target("x", 1.05, "<=", 1.03, 1.06, -0.01)) == (
        "NOT met; unreachable: its bound 1.060 is past the target; 0.010 beyond its bound 1.060, so within the spread"
    )
    assert verdict_text(target("x", 1.05, "<=", 1.03, 1.02, 0.03)) == "NOT met; the code 0.030 from its bound 1.020"
    assert verdict_text(target("y", 0.99, ">=", 0.95, 0.96, 0.03)) == (
        "met; 0.030 beyond its bound 0.960, so within the spread"
    )
    assert verdict_text(target("y", 0.93, ">=", 0.95, 0.96, -0.03)) == "NOT met; the code 0.030 from its bound 0.960"
    assert verdict_text(target("y", 0.93, ">=", 0.95, 0.94, -0.01)) == (
        "NOT met; unreachable: its bound 0.940 is past the target; the code 0.010 from its bound 0.940"
    )


def test_onnx_timing_sessions_share_one_thread_pool_per_process():
    """Timed ONNX sessions share their process's one pool (own pools slowed each other round-robin); a process asked
    for a second pool size fails with a clear error instead of timing with the first size."""
    pytest.importorskip("onnxruntime")
    code = (
        "from pst_yolo.tools.benchmark import onnx_session_options\n"
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


def test_training_flops_count_each_conv_and_attention_product():
    """Conv FLOPs against torch's own counter (1x1 convs) and a hand count (depthwise: the counter's backward ignores
    groups); attention: q k^T and p v forward, four products backward."""
    from torch.utils.flop_counter import FlopCounterMode
    from ultralytics.nn.tasks import DetectionModel

    from pst_yolo.nn import PST
    from pst_yolo.tools.benchmark import (
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


@pytest.mark.slow
def test_training_section_reports_the_median_of_fresh_processes():
    """Three fresh processes, one after the other: every ratio is reported and the rows are the median process's."""
    from pst_yolo.tools.benchmark import bench_train_in_processes, parse_args

    args = parse_args(["--quick", "--train-processes", "3", "--threads", "1"])
    rows, spread = bench_train_in_processes(args, CPU)
    ratios = [run["ratio"] for run in spread]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert len({run["pid"] for run in spread} | {os.getpid()}) == 4, "each in a fresh process"
    assert all(run["ceiling"] > 0 for run in spread)
    (median,) = [run for run in spread if run["ratio"] == sorted(ratios)[1]]
    assert {r["pid"] for r in rows} == {median["pid"]}
    assert {r["model"] for r in rows} == {"yolo12n", "yolo11n-pst"}


@pytest.mark.slow
def test_model_targets_take_the_median_of_fresh_processes():
    """Three fresh processes time the target models (PyTorch and the exported graphs); the targets are the medians."""
    import tempfile
    from pathlib import Path

    from pst_yolo.tools.benchmark import (
        bench_models_onnx,
        bench_target_models_in_processes,
        model_variants,
        parse_args,
        targets,
    )

    args = parse_args(["--quick", "--model-processes", "3", "--threads", "1"])
    variants = model_variants(args.models, args.model_topk, ["auto"], CPU)
    with tempfile.TemporaryDirectory() as folder:
        models = bench_models_onnx(args, variants, Path(folder))
        runs = bench_target_models_in_processes(args, CPU, Path(folder))
        # the shared ONNX Runtime pool lives in the timing processes only: here a plain session (as onnxslim's
        # constant folding makes during an export) still works
        ort = pytest.importorskip("onnxruntime")
        ort.InferenceSession(str(next(Path(folder).glob("*.onnx"))), providers=["CPUExecutionProvider"])
    assert len({run["pid"] for run in runs} | {os.getpid()}) == 4, "each in a fresh process"
    ratios = {name: sorted(run["ratios"][name] for run in runs) for name in runs[0]["ratios"]}
    assert len(ratios) == 10 and all(len(v) == 3 and v[0] > 0 for v in ratios.values())
    results = {
        "op": [], "train": [], "train_processes": [], "score_step": [], "imgsz": args.imgsz, "models": models,
        "model_processes": runs,
    }  # fmt: skip
    by_name = {t["name"]: t for t in targets(results, args.model_topk)}
    k0_pytorch = by_name["YOLO11n-PST k=0 / YOLO12n latency (PyTorch, batch 1)"]
    assert k0_pytorch["value"] == ratios["pytorch k=0 / YOLO12n"][1]
    assert k0_pytorch["bound"] == ratios["pytorch k=0 / YOLO12n bound"][1]
    distances = sorted(
        run["ratios"]["pytorch k=0 / YOLO12n"] - run["ratios"]["pytorch k=0 / YOLO12n bound"] for run in runs
    )
    assert k0_pytorch["from_bound"] == distances[1], "the median of each process's distance, not of the medians"
    fine_ort = by_name["fine attention: YOLO11n-PST k=8 / k=0 latency (ONNX Runtime)"]
    assert fine_ort["value"] == ratios["onnxruntime k=8 / k=0"][1]
