"""The CUDA-path defects found before the first GPU run, each reproduced on the CPU (docs/CUDA.md):

1. AMP: the fine-map statistics overflow float16; 2. kernels installed but not importable; 3. GPU generations the
kernels refuse; 4. the mask constant in float16 engines; 5. ``pst-yolo check`` and ``bench`` on CUDA; 6. the score
pass after the kernel against its float32 log-sum-exp. Plus the guards: non-finite statistics are never stored, and
a checkpoint that holds them says so when loaded.
"""

import copy
import math
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from standins import install_standins
from test_ops import random_inputs

from pst_yolo import PSAttn
from pst_yolo.nn import psa as psa_module
from pst_yolo.ops import backends, coarse_key_scores, pyramid_sparse_attention, resolve_backend
from pst_yolo.ops.backends import kernels_on_any_device, unusable_reason
from pst_yolo.ops.pyramid_sparse_attention import sparse_fine_attention
from pst_yolo.tools import check

P3_640 = ((16, 64, 80, 80), (16, 64, 40, 40))  # x and upper of a PSA at 640 px P3: 102,400 pixels per channel


@pytest.fixture
def warnings_logged(monkeypatch):
    """The messages PSAttn logs as warnings during one test (its once-per-process memory cleared)."""
    messages = []
    monkeypatch.setattr(psa_module, "_WARNED", set())
    monkeypatch.setattr(psa_module.LOGGER, "warning", lambda message, *a, **k: messages.append(message))
    return messages


def train_steps(module: PSAttn, dtype: torch.dtype, steps: int = 3, seed: int = 0) -> None:
    """Training steps of ``module`` under CPU autocast in ``dtype`` on unit-variance P3 features at 640 px."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    for _ in range(steps):
        x, up = (torch.randn(*shape, generator=g) for shape in P3_640)
        with torch.autocast("cpu", dtype):
            out = module(x, up)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def fine_effect(module: PSAttn, seed: int = 1) -> tuple[torch.Tensor, float]:
    """Eval output at top-k 8 (2, 64, 80, 80) and its largest difference to top-k 0."""
    g = torch.Generator().manual_seed(seed)
    x, up = (torch.randn(2, *shape[1:], generator=g) for shape in P3_640)
    module.eval()
    with torch.no_grad():
        module.topk = 0
        coarse = module(x, up)
        module.topk = 8
        fine = module(x, up)
    return fine, (fine - coarse).abs().max().item()


# ------------------------------------------------------------------------------------------------ 1. AMP statistics
@pytest.mark.slow
def test_issue_reproduction_under_autocast_training():
    """The issue's reproduction: PSAttn(64, 2), float16-autocast training at 640 px P3 sizes, then k=8 in eval:
    finite statistics, and a finite k=8 output that visibly differs from k=0 (before: NaN). One step of the issue's
    three: the first already overflowed."""
    torch.manual_seed(0)
    module = PSAttn(64, 2).train()
    train_steps(module, torch.float16, steps=1)
    assert module.fine_kv_var.isfinite().all() and module.fine_kv_mean.isfinite().all()
    out, effect = fine_effect(module)
    assert out.isfinite().all() and effect > 1e-2, f"k=8 vs k=0: {effect:.1e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fine_statistics_under_autocast_equal_float32(dtype):
    """One autocast training step with more pixels per channel than float16 can sum (44 x 40 x 40 = 70,400 of unit
    variance): the tracked statistics are those of the same step in float32."""
    torch.manual_seed(0)
    amp = PSAttn(32, 1).train()
    fp32 = copy.deepcopy(amp)
    x, up = torch.randn(44, 32, 40, 40), torch.randn(44, 32, 20, 20)
    with torch.autocast("cpu", dtype):
        amp(x, up).float().sum().backward()
    fp32(x, up).sum().backward()
    assert amp.fine_kv_var.isfinite().all()
    torch.testing.assert_close(amp.fine_kv_mean, fp32.fine_kv_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(amp.fine_kv_var, fp32.fine_kv_var, rtol=1e-5, atol=1e-6)


def test_autocast_fine_in_training_scores_stay_float32():
    """Every reduction of a training forward that runs the fine branch (fine_in_training) under float16 autocast:
    the eq. 3 scores are float32 and each (batch, head) row sums to 1."""
    q, k, v, _, _ = random_inputs(2, 2, (40, 40), (20, 20))
    q, k = q * 8, k * 8  # logits in the hundreds: float16 rounding would show in the probabilities
    with torch.autocast("cpu", torch.float16):
        scores = coarse_key_scores(q, k)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 2), atol=1e-5, rtol=0)
    module = PSAttn(64, 2, fine_in_training=True).train()
    x, up = torch.randn(4, 64, 20, 20), torch.randn(4, 64, 10, 10)
    with torch.autocast("cpu", torch.float16):
        out = module(x, up)
    out.float().sum().backward()
    assert out.isfinite().all() and module.fine_kv_var.isfinite().all()


# ------------------------------------------------------------------------------------------- guards on the buffers
def test_non_finite_batch_is_left_out_of_the_statistics(warnings_logged):
    module = PSAttn(32, 1).train()
    module(torch.randn(4, 32, 8, 8), torch.randn(4, 32, 4, 4))
    mean, var = module.fine_kv_mean.clone(), module.fine_kv_var.clone()
    bad = torch.randn(4, 32, 8, 8)
    bad[0, 0, 0, 0] = math.inf
    module(bad, torch.randn(4, 32, 4, 4))
    assert torch.equal(module.fine_kv_mean, mean) and torch.equal(module.fine_kv_var, var)
    assert int(module.fine_stats_skipped) == 1 and not warnings_logged
    module.eval()  # the skipped batch is reported at the next mode switch (no GPU sync inside the forward)
    assert len(warnings_logged) == 1 and "1 training batch" in warnings_logged[0]
    module.train()
    module(torch.randn(4, 32, 8, 8), torch.randn(4, 32, 4, 4))
    assert not torch.equal(module.fine_kv_var, var)  # later finite batches are folded in again


def test_loading_non_finite_statistics_warns(warnings_logged, tmp_path):
    """A checkpoint from AMP training before the fix (non-finite fine_kv_var), as torch.load of a pickled module
    (Ultralytics' checkpoints) and through load_state_dict, warns and says how to recompute the statistics."""
    module = PSAttn(32, 1)
    module.fine_kv_var[3] = math.inf
    torch.save(module, tmp_path / "old.pt")
    assert not warnings_logged
    torch.load(tmp_path / "old.pt", weights_only=False)
    assert len(warnings_logged) == 1 and "pst-yolo recalibrate" in warnings_logged[0]
    psa_module._WARNED.clear()
    PSAttn(32, 1).load_state_dict(module.state_dict())
    assert len(warnings_logged) == 2


def test_module_pickled_before_the_skip_counter_loads():
    """Modules pickled by pst-yolo 0.1 have no ``fine_stats_skipped``: unpickling adds it, and training works."""
    module = PSAttn(32, 1)
    del module._buffers["fine_stats_skipped"]
    loaded = pickle.loads(pickle.dumps(module))
    assert int(loaded.fine_stats_skipped) == 0
    loaded.train()(torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4))
    assert "fine_stats_skipped" not in loaded.state_dict()  # not persistent: state dicts keep their keys


# ------------------------------------------------------------------------------------- 2. installed, not importable
def broken_package(tmp_path, monkeypatch, name: str, body: str):
    """A package ``name`` on sys.path whose ``__init__`` runs ``body``; the real one (if any) hidden."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(body)
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_import_problems", {})


@pytest.mark.parametrize(
    "body,expected",
    [
        ("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c10')", "cannot be imported"),
        ("__version__ = '2.8.3'  # flash_attn_2_cuda missing: no flash_attn_func", "no flash_attn_func"),
    ],
)
def test_flash_installed_but_unusable_falls_back(tmp_path, monkeypatch, body, expected):
    install_standins(monkeypatch, names=("sageattention",))
    broken_package(tmp_path, monkeypatch, "flash_attn", body)
    q, k, v, kf, vf = (t.half() for t in random_inputs(1, 1, (16, 16), (8, 8)))
    with kernels_on_any_device():
        assert expected in unusable_reason("flash", q, needs_grad=False)
        assert resolve_backend("auto", q.requires_grad_(), kv_len=64) == "sdpa"  # training: sage has no backward
        q.requires_grad_(False)
        with torch.no_grad():
            assert resolve_backend("auto", q, kv_len=64) == "sage"
            out = pyramid_sparse_attention(q, k, v, kf, vf, (16, 16), (8, 8), backend="auto")
        assert out.isfinite().all()
        with pytest.raises(RuntimeError, match=expected):
            pyramid_sparse_attention(q, k, v, kf, vf, (16, 16), (8, 8), backend="flash")


def test_sage_installed_but_unusable(tmp_path, monkeypatch):
    broken_package(tmp_path, monkeypatch, "sageattention", "raise OSError('libcuda.so.1: cannot open shared object')")
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float16)
    with kernels_on_any_device():
        assert "cannot be imported (OSError" in unusable_reason("sage", q, needs_grad=False, kv_len=64)
        assert resolve_backend("auto", q, kv_len=64) == "sdpa"


# ------------------------------------------------------------------------------------------------ 3. GPU generations
@pytest.mark.parametrize(
    "capability,dtype,flash,sage",
    [
        ((7, 0), torch.float16, "sm80-sm90", "sm75 or newer"),  # V100
        ((7, 5), torch.float16, "sm80-sm90", "triton <= 3.2"),  # T4 with today's Triton
        ((7, 5), torch.bfloat16, "sm80-sm90", "bfloat16"),
        ((8, 0), torch.bfloat16, None, None),  # A100
        ((8, 9), torch.float16, None, None),  # L4, RTX 40xx
        ((9, 0), torch.float16, None, None),  # H100
        ((10, 0), torch.float16, "sm100", None),  # B200
        ((12, 0), torch.bfloat16, "sm120", None),  # RTX 50xx
    ],
)
def test_gpu_generations(monkeypatch, capability, dtype, flash, sage):
    install_standins(monkeypatch)
    q = torch.zeros(1, 1, 4, 32, dtype=dtype)
    with kernels_on_any_device(capability=capability):
        for name, expected in (("flash", flash), ("sage", sage)):
            reason = unusable_reason(name, q, needs_grad=False, kv_len=64)
            assert reason is None if expected is None else expected in reason, (name, reason)
        with torch.no_grad():  # auto never picks a kernel this GPU refuses
            picked = resolve_backend("auto", q, kv_len=64)
        assert picked == ("flash" if flash is None else "sage" if sage is None else "sdpa")


def test_sage_on_turing_with_old_triton(monkeypatch):
    install_standins(monkeypatch)
    monkeypatch.setattr(backends.importlib.metadata, "version", lambda name: "3.2.0")
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float16)
    with kernels_on_any_device(capability=(7, 5)):
        assert unusable_reason("sage", q, needs_grad=False, kv_len=64) is None


# ------------------------------------------------------------------------------------- 4. the mask in fp16 engines
def calibrated_psa(dim: int = 64, heads: int = 2, topk: int = 8) -> tuple[PSAttn, torch.Tensor, torch.Tensor]:
    """A PSAttn whose BN statistics are those of its input (one train-mode forward, momentum 1), and that input at an
    odd size (the last row and column of children are masked)."""
    g = torch.Generator().manual_seed(0)
    x, up = torch.randn(2, dim, 13, 11, generator=g), torch.randn(2, dim, 7, 6, generator=g)
    module = PSAttn(dim, heads, topk=topk)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        module.train()(x, up)
    return module.eval(), x, up


def test_exported_graph_constants_fit_float16(tmp_path):
    """TensorRT builds fp16 engines from the fp32 ONNX: every float constant must stay finite in float16."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    module, x, up = calibrated_psa()
    path = tmp_path / "psa.onnx"
    torch.onnx.export(module, (x, up), str(path), dynamo=False, opset_version=17)
    graph = onnx.load(str(path)).graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute]
    floats = [c for c in constants if c.dtype.kind == "f"]
    assert floats and all(np.isfinite(c.astype(np.float16)).all() for c in floats), [
        c for c in floats if not np.isfinite(c.astype(np.float16)).all()
    ]


def test_masked_children_in_float16():
    """Eq. 5 with masked tokens, run in float16 with the mask as an fp16 engine holds it: finite, equal to fp32."""
    q, _, _, k_fine, v_fine = random_inputs(2, 2, (13, 13), (7, 7))
    k_sel, v_sel = k_fine[:, :, :32], v_fine[:, :, :32]
    valid = torch.rand(2, 2, 32, generator=torch.Generator().manual_seed(0)) > 0.4
    valid[1, 1] = False  # a (batch, head) with no valid token: zero output
    reference = sparse_fine_attention(q.double(), k_sel.double(), v_sel.double(), valid, "naive")
    for backend in ("naive", "sdpa"):
        out = sparse_fine_attention(q.half(), k_sel.half(), v_sel.half(), valid, backend)
        assert out.isfinite().all()
        torch.testing.assert_close(out.double(), reference, atol=5e-3, rtol=0)
        assert out[1, 1].abs().max() == 0


# --------------------------------------------------------------------------------- 6. score pass after the kernel
def test_kernel_score_pass_rows_sum_to_one(monkeypatch):
    """Scores from flash's fp32 log-sum-exp (stand-in) with float16 q, k: each (batch, head) row sums to 1."""
    standins = install_standins(monkeypatch, names=("flash_attn",))
    q, k, v, _, _ = (t.half() for t in random_inputs(2, 2, (40, 40), (20, 20)))
    q = q * 4  # logits of tens: their float16 rounding would be ~1e-2 against the fp32 lse
    out, lse, _ = standins["flash_attn"].flash_attn_func(
        *(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=32**-0.5, return_attn_probs=True
    )
    scores = coarse_key_scores(q, k, lse=lse)
    torch.testing.assert_close(scores.sum(-1), torch.ones(2, 2), atol=1e-5, rtol=0)
    reference = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(32), -1).mean(2)
    torch.testing.assert_close(scores.double(), reference, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------------------- 5. pst-yolo check and bench on CUDA
def test_check_does_not_excuse_a_broken_sage_kernel(monkeypatch):
    """A sage kernel that returns garbage fails ``check``'s backend part (its tolerance is not its own error)."""
    modules = install_standins(monkeypatch)
    monkeypatch.setattr(modules["sageattention"], "sageattn", lambda q, k, v, **kw: torch.zeros_like(q))
    with kernels_on_any_device():
        part = check.check_backends(torch.device("cpu"), [torch.float16], backends=("sage",))
    assert part.status == "failed"
    assert any(r.get("status") == "FAILED" for r in part.rows)


@pytest.mark.slow
def test_check_feeds_exported_models_float32(tmp_path):
    """An exported model whose input is float32, asked for with half=True (as a TensorRT fp16 engine built from an
    fp32 ONNX, which keeps fp32 bindings): ``check`` feeds float32 and gets PyTorch's output back."""
    from ultralytics import YOLO

    from pst_yolo.tools.calibration import calibrate_random_weights, letterboxed

    model = YOLO("yolo11n-pst.yaml")
    x = letterboxed("bus.jpg", (64, 64))
    calibrate_random_weights(model.model, x)
    path = model.export(format="onnx", imgsz=64, project=str(tmp_path))
    with torch.no_grad():
        expected = model.model.float().eval()(x)[0]
    out = check.run_exported(path, x, torch.device("cpu"), half=True)
    assert check._output_difference(out, expected, 64) < 1e-2  # fp32 rounding; half input gives garbage or an error


@pytest.mark.parametrize(
    "cuda,amp,stats,effect,status,reason",
    [
        (True, True, True, 0.2, "passed", ""),
        (True, False, True, 0.2, "passed", "switched AMP off"),  # Ultralytics' own choice: no failure
        (True, True, False, 0.2, "failed", "non-finite fine-map statistics"),
        (True, True, True, math.nan, "failed", "non-finite outputs"),
        (False, False, True, 0.0, "failed", "does not act"),
        (False, False, True, 0.2, "passed", ""),
    ],
)
def test_check_training_verdict(cuda, amp, stats, effect, status, reason):
    row = {"amp": amp, "train/box_loss": 1.0, "fine stats finite": stats, "k=8 vs k=0": effect}
    verdict = check.training_verdict(cuda, row, saved=True)
    assert verdict[0] == status and reason in verdict[1]
    if effect == 0.0:  # --quick does not judge the effect, but still a NaN output
        assert check.training_verdict(cuda, row, saved=True, check_effect=False)[0] == "passed"
    assert check.training_verdict(cuda, {**row, "k=8 vs k=0": math.nan}, True, check_effect=False)[0] == "failed"


def test_bench_picks_sage_only_where_the_key_count_allows(monkeypatch):
    """At 128 px P4 has 16 upper tokens, which sage refuses: bench times sage at P3 (64 keys) only."""
    from pst_yolo.tools.bench.cli import parse_args
    from pst_yolo.tools.bench.op import bench_op, usable_backends

    install_standins(monkeypatch)
    args = SimpleNamespace(**{**vars(parse_args(["--quick"])), "op_sizes": [128], "backends": ["sage"]})
    with kernels_on_any_device():
        assert usable_backends(["sage"], torch.device("cpu"), torch.float16, kv_len=16) == []
        rows = bench_op(args, torch.device("cpu"), torch.float16, gemm=1.0)
    timed = {(r.get("level"), r.get("backend")) for r in rows}
    assert ("P3", "sage") in timed and ("P4", "sage") not in timed, timed
