"""Pyramid Sparse Attention op against an independent reference written from the paper's equations (2-5)."""

import math

import pytest
import torch

from pst_yolo.ops import coarse_key_scores, pyramid_sparse_attention, select_fine_tokens
from pst_yolo.ops.backends import unusable_reason
from pst_yolo.ops.reference import pyramid_sparse_attention_reference as reference_psa
from pst_yolo.ops.statistics import pointwise_conv_moments

SHAPES = [  # (B, heads, (H, W), (Hu, Wu))
    (1, 1, (8, 8), (4, 4)),
    (2, 3, (13, 13), (7, 7)),
    (2, 2, (10, 6), (5, 3)),
    (1, 2, (5, 9), (3, 5)),
]


def loop_reference(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk, threshold):
    """Eq. 2-5 in float64 with explicit loops over batch items, heads and selected coarse tokens: an implementation
    independent of pst_yolo.ops.reference, which every other test takes its reference from."""
    q, k, v, k_fine, v_fine = (t.double() for t in (q, k, v, k_fine, v_fine))
    (H, W), (_, Wu) = fine_hw, coarse_hw
    d = q.shape[-1]
    probs = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(d), dim=-1)  # eq. 2
    out = torch.einsum("bhnm,bhmd->bhnd", probs, v)
    if topk == 0:
        return out
    scores = probs.mean(dim=2)  # eq. 3: mean over queries, (B, h, M)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ranked = sorted(range(scores.shape[-1]), key=lambda m: -scores[b, h, m].item())[:topk]
            fine_tokens = []
            for m in ranked:
                if scores[b, h, m] <= threshold:
                    continue
                i, j = divmod(m, Wu)
                fine_tokens += [
                    (2 * i + a) * W + 2 * j + c for a in (0, 1) for c in (0, 1) if 2 * i + a < H and 2 * j + c < W
                ]
            if fine_tokens:  # eq. 4-5
                k_sel, v_sel = k_fine[b, h, fine_tokens], v_fine[b, h, fine_tokens]
                out[b, h] += torch.softmax(q[b, h] @ k_sel.T / math.sqrt(d), dim=-1) @ v_sel
    return out


def random_inputs(B, heads, fine_hw, coarse_hw, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, M = fine_hw[0] * fine_hw[1], coarse_hw[0] * coarse_hw[1]
    q, k_fine, v_fine = (torch.randn(B, heads, N, d, generator=g) for _ in range(3))
    k, v = (torch.randn(B, heads, M, d, generator=g) for _ in range(2))
    return q * 2, k, v, k_fine, v_fine  # * 2 sharpens the softmax so scores are far from uniform


def available_backends():
    q = torch.zeros(1, 1, 1, 32, device="cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in ("naive", "sdpa", "flash", "sage") if unusable_reason(b, q, needs_grad=False) is None]


@pytest.mark.parametrize("topk,threshold", [(0, 1e-6), (1, 1e-6), (8, 1e-6), (1000, 1e-6), (30, 1 / 49)])
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_reference_module_matches_loops(topk, threshold, B, heads, fine_hw, coarse_hw):
    """pst_yolo.ops.reference (dense, vectorised) against explicit loops over items, heads and selected tokens."""
    inputs = random_inputs(B, heads, fine_hw, coarse_hw, seed=1)
    expected = loop_reference(*inputs, fine_hw, coarse_hw, topk, threshold)
    torch.testing.assert_close(reference_psa(*inputs, fine_hw, coarse_hw, topk, threshold), expected)


def folded(conv, mean=None, var=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in float64 of an Ultralytics Conv (bias-free conv + BN), BN folded; optionally with other
    statistics (the fine map's) in place of the BN's running ones."""
    bn = conv.bn
    mean, var = bn.running_mean if mean is None else mean, bn.running_var if var is None else var
    scale = bn.weight * (var + bn.eps).rsqrt()
    return (conv.conv.weight * scale[:, None, None, None]).double(), (bn.bias - mean * scale).double()


@pytest.mark.parametrize("topk", [0, 8])
def test_psa_module_is_the_paper_layer(topk):
    """PSAttn in eval, before and after Ultralytics' fuse, equals eq. 1-6 of pst_yolo.ops.reference on its weights."""
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    from pst_yolo import PSAttn
    from pst_yolo.ops.reference import PSALayerWeights, psa_layer_reference

    g = torch.Generator().manual_seed(0)
    x, up = torch.randn(2, 64, 13, 11, generator=g), torch.randn(2, 64, 7, 6, generator=g)
    module = PSAttn(64, 2, topk=topk)
    for m in module.modules():  # BN statistics of this input (momentum 1), so that the fine branch acts
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        module.train()(x, up)
        module.eval()
        weights = PSALayerWeights(
            folded(module.q), folded(module.kv), folded(module.kv, module.fine_kv_mean, module.fine_kv_var),
            folded(module.pe), folded(module.proj),
        )  # fmt: skip
        expected = psa_layer_reference(x.double(), up.double(), weights, num_heads=2, topk=topk)
        out = module(x, up)
        module.fold_fine_norm()  # then what Ultralytics' BaseModel.fuse does to each Conv
        for conv in (module.q, module.kv, module.pe, module.proj):
            conv.conv, conv.forward = fuse_conv_and_bn(conv.conv, conv.bn), conv.forward_fuse
            delattr(conv, "bn")
        fused = module(x, up)
    coarse_only = psa_layer_reference(x.double(), up.double(), weights, num_heads=2, topk=0)
    assert topk == 0 or (expected - coarse_only).abs().max() > 1e-2  # the fine attention acts here
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("topk", [0, 1, 8, 1000])
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_matches_reference_fp32(backend, topk, B, heads, fine_hw, coarse_hw):
    q, k, v, k_fine, v_fine = random_inputs(B, heads, fine_hw, coarse_hw)
    out = pyramid_sparse_attention(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk=topk, backend=backend)
    expected = reference_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk, 1e-6)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_threshold_drops_low_scores(backend):
    """With threshold = 1/M (the mean score) roughly half the top tokens are dropped; results still match."""
    fine_hw, coarse_hw = (13, 13), (7, 7)
    q, k, v, k_fine, v_fine = random_inputs(2, 2, fine_hw, coarse_hw, seed=1)
    threshold = 1 / 49
    scores = coarse_key_scores(q, k)
    top = scores.topk(30, dim=-1).values
    assert (top <= threshold).any() and (top > threshold).any(), "test data must straddle the threshold"
    out = pyramid_sparse_attention(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, 30, threshold, backend)
    expected = reference_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, 30, threshold)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_no_token_over_threshold_gives_coarse_only():
    fine_hw, coarse_hw = (10, 6), (5, 3)
    q, k, v, k_fine, v_fine = random_inputs(2, 2, fine_hw, coarse_hw)
    coarse = pyramid_sparse_attention(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk=0)
    none_pass = pyramid_sparse_attention(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk=8, threshold=1.0)
    torch.testing.assert_close(none_pass, coarse, atol=1e-5, rtol=0)  # k>0 computes O_coarse in its fused pass


def test_selection_maps_children_and_masks_outside():
    """Coarse (i, j) -> fine (2i+a, 2j+b); on 13x13 over 7x7 the last coarse row/col has children outside."""
    scores = torch.zeros(1, 1, 49)
    scores[0, 0, 48] = 0.9  # coarse (6, 6): only child (12, 12) is inside
    scores[0, 0, 8] = 0.1  # coarse (1, 1): children (2, 2), (2, 3), (3, 2), (3, 3)
    index, valid = select_fine_tokens(scores, (13, 13), (7, 7), topk=2, threshold=1e-6)
    kept = sorted(index[valid].tolist())
    assert kept == sorted([12 * 13 + 12, 2 * 13 + 2, 2 * 13 + 3, 3 * 13 + 2, 3 * 13 + 3])
    assert valid.sum() == 5 and index.shape == (1, 1, 8)


def test_topk_larger_than_tokens_uses_all():
    q, k, v, k_fine, v_fine = random_inputs(1, 1, (4, 4), (2, 2))
    index, valid = select_fine_tokens(coarse_key_scores(q, k), (4, 4), (2, 2), topk=100, threshold=0.0)
    assert sorted(index[valid].tolist()) == list(range(16))


def test_deterministic():
    q, k, v, k_fine, v_fine = random_inputs(2, 2, (13, 13), (7, 7))
    a = pyramid_sparse_attention(q, k, v, k_fine, v_fine, (13, 13), (7, 7), topk=8)
    b = pyramid_sparse_attention(q, k, v, k_fine, v_fine, (13, 13), (7, 7), topk=8)
    assert torch.equal(a, b)


def test_chunked_scores_equal_full():
    q, k, *_ = random_inputs(2, 3, (13, 13), (7, 7))
    full = coarse_key_scores(q, k, max_chunk_elements=1 << 30)
    chunked = coarse_key_scores(q, k, max_chunk_elements=2 * 3 * 49 * 5)  # 5 query rows per chunk
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(32), -1).mean(2)
    torch.testing.assert_close(full.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES[1:3])
def test_every_available_backend(B, heads, fine_hw, coarse_hw):
    """Each usable backend (flash/sage need CUDA + fp16) against the reference; the fast paths get a loose tolerance."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, k_fine, v_fine = random_inputs(B, heads, fine_hw, coarse_hw)
    expected = reference_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, 8, 1e-6)
    for backend in available_backends():
        dtype = torch.float32 if backend in ("naive", "sdpa") else torch.float16
        args = [t.to(device, dtype) for t in (q, k, v, k_fine, v_fine)]
        out = pyramid_sparse_attention(*args, fine_hw, coarse_hw, topk=8, backend=backend).double().cpu()
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, expected, atol=atol, rtol=0, msg=f"backend {backend}")


@pytest.mark.parametrize("backend,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_unusable_backend_raises_clear_error(backend, package):
    q, k, v, k_fine, v_fine = random_inputs(1, 1, (4, 4), (2, 2))
    reason = unusable_reason(backend, q, needs_grad=False)
    if reason is None:
        pytest.skip(f"{backend} is usable on this machine")
    with pytest.raises(RuntimeError, match=backend):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (4, 4), (2, 2), backend=backend)


def test_bad_shapes_and_topk_rejected():
    q, k, v, k_fine, v_fine = random_inputs(1, 1, (8, 8), (4, 4))
    with pytest.raises(ValueError, match="half"):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (8, 8), (2, 8))
    with pytest.raises(ValueError, match="topk"):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (8, 8), (4, 4), topk=-1)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        pyramid_sparse_attention(q, k, v, k_fine, v_fine, (8, 8), (4, 4), backend="cudnn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_conv_moments_equal_the_conv_outputs_statistics(dtype):
    """Mean and unbiased variance per output channel, as BatchNorm tracks them, from the input's moments alone."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 7, 9, generator=g) * torch.linspace(0.5, 4, 5)[:, None, None] + 2).to(dtype)
    weight = torch.randn(10, 5, 1, 1, generator=g).to(dtype)
    y = torch.nn.functional.conv2d(x.double(), weight.double())
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=1)
    got_mean, got_var = pointwise_conv_moments(x, weight)
    assert got_mean.dtype == got_var.dtype == torch.float32
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_var.double(), var, rtol=1e-5, atol=1e-5)
