"""The flash/sage adapters of pst_yolo.ops.backends through contract stand-ins of the two packages, on the CPU.

The stand-ins (tests/standins) implement flash-attn 2.8's ``flash_attn_func`` and sageattention 1.0.6's
``sageattn`` as their sources define them (layout, dtypes, head-dim limits, return values, refusals). The first
tests hold the stand-ins to that contract; the rest run the op's reference checks through the adapters, with the
CUDA check lifted by the seam ``kernels_on_any_device`` that backends.py offers for this purpose.

Tolerances: flash-attention's rule (tests/psa_precision.py): the error against float64 on the same rounded inputs is
at most twice that of plain PyTorch in the same precision. SageAttention quantises q and k to int8, so its baseline
is the error of the stand-in kernel alone on the dense coarse attention: the adapter may add no error of its own.
"""

import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from psa_precision import precision_errors
from standins import install_standins
from test_ops import SHAPES, random_inputs

from pst_yolo.ops import pyramid_sparse_attention, resolve_backend
from pst_yolo.ops.backends import attention, kernels_on_any_device, unusable_reason

HALF = [torch.float16, torch.bfloat16]
SAGE_SHAPES = [(2, 2, (16, 16), (8, 8)), (1, 3, (15, 31), (8, 16))]  # M = 64, 128: multiples of sage's key block


@pytest.fixture
def standins(monkeypatch):
    """flash_attn and sageattention stand-ins in sys.modules and the adapters' CUDA check lifted, for one test."""
    modules = install_standins(monkeypatch)
    with kernels_on_any_device():
        yield modules


def dense_reference(q, k, v):
    """softmax(q k^T / sqrt(d)) v and the natural-log row log-sum-exp, in float64; q (B, h, N, d)."""
    logits = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(logits, dim=-1) @ v.double(), torch.logsumexp(logits, dim=-1)


# ------------------------------------------------------------------------------------ the stand-ins' contract
def test_flash_standin_contract(standins):
    flash_attn_func = standins["flash_attn"].flash_attn_func
    q, k, v = (torch.randn(2, n, 3, 32, dtype=torch.float16) for n in (13, 7, 7))  # (B, N, h, d), N != M
    out, lse, s_dmask = flash_attn_func(q, k, v, softmax_scale=32**-0.5, return_attn_probs=True)
    expected, expected_lse = dense_reference(*(t.transpose(1, 2) for t in (q, k, v)))
    assert out.shape == q.shape and out.dtype == torch.float16
    assert lse.shape == (2, 3, 13) and lse.dtype == torch.float32 and s_dmask.numel() == 0
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=0)
    assert torch.equal(flash_attn_func(q, k, v), out)  # softmax_scale=None means headdim ** -0.5
    qg = q.clone().requires_grad_()
    flash_attn_func(qg, k, v).float().sum().backward()  # flash has a backward pass
    assert qg.grad is not None and qg.grad.abs().sum() > 0


def test_flash_standin_refusals(standins):
    flash_attn_func = standins["flash_attn"].flash_attn_func
    q = torch.randn(1, 4, 1, 32)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        flash_attn_func(q, q, q)
    with pytest.raises(RuntimeError, match="same dtype"):
        flash_attn_func(q.half(), q.bfloat16(), q.half())
    big = torch.randn(1, 4, 1, 264, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="at most 256"):
        flash_attn_func(big, big, big)
    odd = torch.randn(1, 4, 1, 20, dtype=torch.float16)  # padded to 24 inside, sliced back
    assert flash_attn_func(odd, odd, odd).shape == odd.shape


def test_sage_standin_contract(standins):
    sageattn = standins["sageattention"].sageattn
    q, k, v = (torch.randn(2, 3, n, 64, dtype=torch.float16) for n in (200, 128, 128))  # HND
    k_before = k.clone()
    out = sageattn(q, k, v, tensor_layout="HND", sm_scale=64**-0.5)
    expected, _ = dense_reference(q, k_before, v)
    assert out.shape == q.shape and out.dtype == torch.float16
    assert not torch.equal(k, k_before), "smooth_k=True subtracts the mean key in place"
    torch.testing.assert_close(
        k.double(), (k_before.double() - k_before.double().mean(2, keepdim=True)), atol=2e-3, rtol=0
    )
    assert (out.double() - expected).abs().max() < 0.05  # int8 q/k: worse than fp16, still close
    nhd = sageattn(*(t.transpose(1, 2).contiguous() for t in (q, k_before.clone(), v)), tensor_layout="NHD")
    torch.testing.assert_close(nhd.transpose(1, 2), out, atol=0, rtol=0)
    grad_q = q.clone().requires_grad_()
    assert not sageattn(grad_q, k_before.clone(), v).requires_grad  # no backward: outside autograd


def test_sage_standin_refusals_and_padding_defect(standins):
    sageattn = standins["sageattention"].sageattn
    q = torch.randn(1, 1, 64, 32, dtype=torch.float16)
    with pytest.raises(AssertionError, match="headdim"):
        sageattn(q, q.clone(), q)  # head dim 32: pst_yolo zero-pads to 64
    wide = torch.randn(1, 1, 64, 128, dtype=torch.float16)[..., ::2]
    with pytest.raises(AssertionError, match="contiguous"):
        sageattn(wide, wide.clone(), wide)
    # 1.0.6 leaves the padding of the last 64-key block unmasked: 49 keys come out too small, 64 do not.
    q, k, v = (torch.randn(1, 2, n, 64, dtype=torch.float16) for n in (128, 49, 49))
    expected, _ = dense_reference(q, k, v)
    shrink = sageattn(q, k.clone(), v).double().norm() / expected.norm()
    assert shrink < 0.95


SAGE_REAL_VS_STANDIN = """
    import importlib.util, math, sys, torch
    from sageattention.quant_per_block import per_block_int8  # 1.0.6's own Triton kernels, interpreted on the CPU
    from sageattention.attn_qk_int8_per_block import forward
    spec = importlib.util.spec_from_file_location("standin_core", sys.argv[1])
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    torch.manual_seed(0)
    for kv_len in (49, 64, 100, 192):
        q, k, v = (torch.randn(1, 2, n, 64, dtype=torch.float16) for n in (200, kv_len, kv_len))
        # core.sageattn's non-causal path without its `assert q.is_cuda`: smooth_k, int8 quantisation, kernel
        smoothed = k - k.mean(dim=2, keepdim=True)
        q8, q_scale, k8, k_scale = per_block_int8(q, smoothed, sm_scale=64**-0.5)
        real = forward(q8, k8, v, q_scale, k_scale, output_dtype=torch.float16).double()
        ours = standin.sageattn(q, k.clone(), v, sm_scale=64**-0.5).double()
        exact = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 8, -1) @ v.double()
        print(kv_len, (real - ours).abs().max().item(), (real - exact).abs().max().item())
"""


def test_sage_standin_matches_the_real_kernels():
    """sageattention 1.0.6's Triton kernels run on the CPU under TRITON_INTERPRET=1 (fp16; the interpreter mishandles
    bf16): the stand-in reproduces them to fp16 rounding, the unmasked key padding included."""
    if importlib.util.find_spec("sageattention") is None or importlib.util.find_spec("triton") is None:
        pytest.skip("sageattention 1.0.6 and triton not installed (pip install -e '.[dev]')")
    if importlib.metadata.version("sageattention") != "1.0.6":
        pytest.skip(f"the stand-in models sageattention 1.0.6, {importlib.metadata.version('sageattention')} found")
    standin = Path(__file__).parent / "standins" / "sageattention" / "core.py"
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SAGE_REAL_VS_STANDIN), str(standin)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {int(n): (float(a), float(b)) for n, a, b in (line.split() for line in result.stdout.split("\n") if line)}
    print(f"\nsage 1.0.6 real kernel (keys: |real - stand-in|, |real - float64|): {rows}")
    assert all(vs_standin < 2e-3 for vs_standin, _ in rows.values())
    assert rows[49][1] > 5 * rows[64][1], "the real kernel shows the padding defect the stand-in models"


# ------------------------------------------------------------------------------------- the adapters through them
def test_seam_is_needed_and_restores(monkeypatch):
    install_standins(monkeypatch)
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float16)
    assert "CUDA" in unusable_reason("flash", q, needs_grad=False)
    with kernels_on_any_device():
        assert unusable_reason("flash", q, needs_grad=False) is None
        assert resolve_backend("auto", q, kv_len=64) == "flash"
    assert "CUDA" in unusable_reason("flash", q, needs_grad=False)
    assert resolve_backend("auto", q) == "sdpa"


def test_adapters_refuse_what_the_packages_cannot_do(standins):
    q = torch.zeros(1, 1, 4, 32, dtype=torch.float16)
    assert "float16/bfloat16" in unusable_reason("flash", q.float(), needs_grad=False)
    assert "backward" in unusable_reason("sage", q, needs_grad=True)
    assert "multiple of 64" in unusable_reason("sage", q, needs_grad=False, kv_len=49)
    assert unusable_reason("sage", q, needs_grad=False, kv_len=128) is None
    assert resolve_backend("auto", q.requires_grad_(), kv_len=49) == "flash"  # sage is never picked for training
    inputs = random_inputs(1, 1, (13, 13), (7, 7))
    with pytest.raises(RuntimeError, match="multiple of 64"):
        pyramid_sparse_attention(*(t.half() for t in inputs), (13, 13), (7, 7), backend="sage")


@pytest.mark.parametrize("dtype", HALF)
def test_flash_adapter_dense_and_lse(standins, dtype):
    """``attention(..., "flash", return_lse=True)``: output (B, h, N, d) and the lse the score pass consumes."""
    q, k, v, *_ = (t.to(dtype) for t in random_inputs(2, 3, (13, 13), (7, 7)))
    out, lse = attention(q, k, v, "flash", return_lse=True)
    expected, expected_lse = dense_reference(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=0)
    plain = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(32), dim=-1) @ v
    assert (out.double() - expected).abs().max() <= 2 * (plain.double() - expected).abs().max()


@pytest.mark.parametrize("topk", [0, 8, 1000])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_op_through_flash(standins, topk, dtype, B, heads, fine_hw, coarse_hw):
    """The op with ``flash`` and the kernel pass (scores from flash's lse) against float64, flash-attention's rule."""
    calls = []
    flash_attn_func = standins["flash_attn"].flash_attn_func
    standins["flash_attn"].flash_attn_func = lambda *a, **kw: calls.append(kw) or flash_attn_func(*a, **kw)
    inputs = [t.to(dtype) for t in random_inputs(B, heads, fine_hw, coarse_hw)]
    out = pyramid_sparse_attention(*inputs, fine_hw, coarse_hw, topk=topk, backend="flash", coarse_pass="kernel")
    assert len(calls) == 1 and calls[0]["return_attn_probs"] == (topk > 0)  # the lse is asked for when scored
    error, plain_error = precision_errors(out, inputs, fine_hw, coarse_hw, topk)
    assert out.dtype == dtype and error <= 2 * plain_error, f"flash {error:.2e} vs plain PyTorch {plain_error:.2e}"


@pytest.mark.parametrize("topk", [0, 8])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SAGE_SHAPES)
def test_op_through_sage(standins, topk, dtype, B, heads, fine_hw, coarse_hw):
    """The op with ``sage`` (inference) against float64: at most twice the larger of plain PyTorch's error and
    the sage kernel's own error on the dense coarse attention (its int8 quantisation)."""
    inputs = [t.to(dtype) for t in random_inputs(B, heads, fine_hw, coarse_hw)]
    q, k, v = inputs[:3]
    k_before = k.clone()
    with torch.no_grad():
        out = pyramid_sparse_attention(*inputs, fine_hw, coarse_hw, topk=topk, backend="sage", coarse_pass="kernel")
        padded = [torch.nn.functional.pad(t, (0, 32)).contiguous() for t in (q, k, v)]
        kernel_alone = standins["sageattention"].sageattn(*padded, sm_scale=32**-0.5)[..., :32]
    assert torch.equal(k, k_before), "the adapter must keep sage's in-place smooth_k off the caller's keys"
    error, plain_error = precision_errors(out, inputs, fine_hw, coarse_hw, topk)
    kernel_error = (kernel_alone.double() - dense_reference(q, k, v)[0]).abs().max().item()
    assert out.dtype == dtype and error <= 2 * max(plain_error, kernel_error), (
        f"sage {error:.2e}, plain PyTorch {plain_error:.2e}, sage kernel alone {kernel_error:.2e}"
    )


@pytest.mark.parametrize("backend", ["flash", "sage"])
def test_threshold_through_kernels(standins, backend):
    """The threshold (here the mean score, 1/M) drops low-scored tokens on the kernel pass as on the reference."""
    fine_hw, coarse_hw = ((13, 13), (7, 7)) if backend == "flash" else ((16, 16), (8, 8))
    inputs = [t.half() for t in random_inputs(2, 2, fine_hw, coarse_hw, seed=1)]
    threshold = 1 / (coarse_hw[0] * coarse_hw[1])
    with torch.no_grad():
        out = pyramid_sparse_attention(
            *inputs, fine_hw, coarse_hw, 30, threshold, backend=backend, coarse_pass="kernel"
        )
    error, plain_error = precision_errors(out, inputs, fine_hw, coarse_hw, 30, threshold)
    q, k, v = inputs[:3]
    kernel_error = 0.0
    if backend == "sage":
        padded = [torch.nn.functional.pad(t, (0, 32)).contiguous() for t in (q, k, v)]
        kernel_alone = standins["sageattention"].sageattn(*padded, sm_scale=32**-0.5)[..., :32]
        kernel_error = (kernel_alone.double() - dense_reference(q, k, v)[0]).abs().max().item()
    assert error <= 2 * max(plain_error, kernel_error), (error, plain_error, kernel_error)
