"""Both coarse passes of the op on the CPU against the float64 eq. 2-5 reference.

On CUDA the op runs the backend's kernel and then a blocked score pass (``coarse_pass="kernel"``), on the CPU the
fused blocked pass (``"fused"``); the choice is an argument of the op, so both branches are checked here on the
existing shapes (odd sizes, threshold, k > M), with scores taken from a log-sum-exp and recomputed.
"""

import math

import pytest
import torch
from test_ops import SHAPES, random_inputs

from pst_yolo.ops import coarse_attention_with_scores, coarse_key_scores, pyramid_sparse_attention
from pst_yolo.ops.blocked_pass import blocked_attention_with_scores
from pst_yolo.ops.pyramid_sparse_attention import COARSE_PASSES, default_coarse_pass
from pst_yolo.ops.reference import pyramid_sparse_attention_reference as reference_psa


def reference_scores(q, k) -> torch.Tensor:
    """Eq. 3 in float64: (B, h, M)."""
    return torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1).mean(dim=2)


@pytest.mark.parametrize("coarse_pass", COARSE_PASSES)
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("topk", [1, 8, 1000])
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_op_matches_reference(coarse_pass, backend, topk, B, heads, fine_hw, coarse_hw):
    q, k, v, k_fine, v_fine = random_inputs(B, heads, fine_hw, coarse_hw)
    out = pyramid_sparse_attention(
        q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk=topk, backend=backend, coarse_pass=coarse_pass
    )
    expected = reference_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk, 1e-6)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coarse_pass", COARSE_PASSES)
def test_threshold_with_either_pass(coarse_pass):
    fine_hw, coarse_hw = (13, 13), (7, 7)
    q, k, v, k_fine, v_fine = random_inputs(2, 2, fine_hw, coarse_hw, seed=1)
    threshold = 1 / 49  # the mean score: drops about half of the 30 top tokens (checked in test_ops)
    out = pyramid_sparse_attention(
        q, k, v, k_fine, v_fine, fine_hw, coarse_hw, 30, threshold, "sdpa", coarse_pass=coarse_pass
    )
    expected = reference_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, 30, threshold)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coarse_pass", COARSE_PASSES)
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_coarse_output_and_scores(coarse_pass, B, heads, fine_hw, coarse_hw):
    """The (out, scores) pair each pass returns; the kernel pass in small query chunks too."""
    q, k, v, *_ = random_inputs(B, heads, fine_hw, coarse_hw)
    out, scores = coarse_attention_with_scores(
        q, k, v, "sdpa", max_chunk_elements=7 * k.shape[2], coarse_pass=coarse_pass
    )
    probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(32), dim=-1)
    torch.testing.assert_close(out.double(), probs @ v.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.double(), reference_scores(q, k), atol=1e-6, rtol=0)
    assert scores.dtype == torch.float32


@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_scores_from_log_sum_exp(B, heads, fine_hw, coarse_hw):
    """The kernel pass's score step with a row log-sum-exp (what flash returns) equals the recomputed softmax."""
    q, k, *_ = random_inputs(B, heads, fine_hw, coarse_hw)
    lse = torch.logsumexp(q.double() @ k.double().transpose(-2, -1) / math.sqrt(32), dim=-1).float()  # (B, h, N)
    with_lse = coarse_key_scores(q, k, lse=lse, max_chunk_elements=5 * k.shape[2])
    without = coarse_key_scores(q, k, max_chunk_elements=5 * k.shape[2])
    torch.testing.assert_close(with_lse.double(), reference_scores(q, k), atol=1e-6, rtol=0)
    torch.testing.assert_close(with_lse, without, atol=1e-6, rtol=0)


def test_kernel_pass_gradients_match_fused():
    """Training through either pass (fine branch on, as with fine_in_training) gives the same gradients."""
    fine_hw, coarse_hw = (13, 13), (7, 7)
    grads = {}
    for coarse_pass in COARSE_PASSES:
        inputs = [t.requires_grad_() for t in random_inputs(2, 2, fine_hw, coarse_hw)]
        out = pyramid_sparse_attention(*inputs, fine_hw, coarse_hw, topk=8, backend="sdpa", coarse_pass=coarse_pass)
        out.square().sum().backward()
        grads[coarse_pass] = [t.grad for t in inputs]
    for fused, kernel in zip(grads["fused"], grads["kernel"]):
        torch.testing.assert_close(kernel, fused, atol=1e-5, rtol=1e-5)


def test_blocked_pass_drops_a_nan_query_from_the_scores():
    """The blocked pass over several blocks (the last one shorter): a NaN query row keeps its NaN output and adds
    nothing to the scores; every other row and score equals the float64 softmax."""
    q, k, v, *_ = random_inputs(1, 2, (13, 11), (7, 6))
    q[0, 1, 100] = float("nan")
    out, scores = blocked_attention_with_scores(q, k, v, 2 * 20 * k.shape[2])  # 7 blocks of 20 rows, then 3
    assert torch.isnan(out[0, 1, 100]).all() and torch.isfinite(scores).all()
    keep = torch.arange(q.shape[2]) != 100
    probs = torch.softmax(q.double() @ k.double().transpose(-2, -1) / math.sqrt(32), dim=-1)
    torch.testing.assert_close(out[:, :, keep].double(), (probs @ v.double())[:, :, keep], atol=1e-5, rtol=0)
    probs[0, 1, 100] = 0
    torch.testing.assert_close(scores.double(), probs.sum(dim=2) / q.shape[2], atol=1e-6, rtol=0)


def test_default_pass_per_device():
    """Today's choice: fused on CPU and for ``naive``; the kernel pass on any other device (meta stands for CUDA)."""
    cpu, meta = torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32, device="meta")
    assert default_coarse_pass(cpu, "sdpa") == "fused"
    assert default_coarse_pass(meta, "naive") == "fused"
    assert default_coarse_pass(meta, "sdpa") == default_coarse_pass(meta, "flash") == "kernel"


def test_unknown_pass_rejected():
    q, k, v, k_fine, v_fine = random_inputs(1, 1, (8, 8), (4, 4))
    with pytest.raises(ValueError, match="coarse_pass"):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (8, 8), (4, 4), coarse_pass="blocked")
    with pytest.raises(ValueError, match="coarse_pass"):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (8, 8), (4, 4), topk=0, coarse_pass="blocked")
