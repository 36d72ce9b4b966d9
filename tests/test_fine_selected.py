"""Fine K/V for the selected tokens only: the op's ``FineProjection`` path and PSAttn's wiring of it.

Projecting only each head's 4k selected fine tokens must equal projecting the whole fine map and gathering (the
full-map path, which PSAttn still takes where BatchNorm needs batch statistics) to fp32 rounding: at odd sizes with
masked children, k > M, fused and unfused, shared and unshared K/V, with the gate, in eager mode and in ONNX.
"""

from __future__ import annotations

import pytest
import torch
from test_ops import random_inputs
from ultralytics.nn.modules import Conv
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from pst_yolo import PSAttn
from pst_yolo.ops import FineProjection, pyramid_sparse_attention_parts, select_fine_tokens
from pst_yolo.ops.pyramid_sparse_attention import gather_tokens, selected_keys_values
from pst_yolo.ops.reference import pyramid_sparse_attention_reference as reference_psa

SHAPES = [(2, 3, (13, 13), (7, 7)), (2, 2, (10, 6), (5, 3))]  # (B, heads, fine_hw, coarse_hw): odd and uneven


def random_projection(B, heads, fine_hw, channels=24, d=32, affine=True, seed=0) -> FineProjection:
    """Random fine-map features (B, C, N) and a K/V projection (2, h, d, C) with a BN-like affine (2, h, d)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, channels, fine_hw[0] * fine_hw[1], generator=g) * 2 + 0.5
    weight = torch.randn(2, heads, d, channels, generator=g) / channels**0.5
    if not affine:
        return FineProjection(features, weight)
    scale, shift = torch.rand(2, heads, d, generator=g) + 0.5, torch.randn(2, heads, d, generator=g)
    return FineProjection(features, weight, scale, shift)


def full_map_keys_values(p: FineProjection) -> tuple[torch.Tensor, torch.Tensor]:
    """The projection over all N tokens, as the full-map path computes it: (B, h, N, d) keys and values."""
    kv = torch.einsum("shdc,bcn->sbhnd", p.weight, p.features)  # (2, B, h, N, d)
    if p.scale is not None:
        kv = kv * p.scale[:, None, :, None, :]
    if p.shift is not None:
        kv = kv + p.shift[:, None, :, None, :]
    return kv[0], kv[1]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_selected_keys_values_equal_gathered_full_map(affine, B, heads, fine_hw, coarse_hw):
    """Every coarse token selected (k > M): masked children (index 0) included."""
    p = random_projection(B, heads, fine_hw, affine=affine)
    scores = torch.rand(B, heads, coarse_hw[0] * coarse_hw[1])
    index, valid = select_fine_tokens(scores, fine_hw, coarse_hw, topk=1000, threshold=0.0)
    assert valid.all() == (fine_hw[0] % 2 == fine_hw[1] % 2 == 0), "odd sizes give masked children, even none"
    k_sel, v_sel = selected_keys_values(p, index)
    k_fine, v_fine = full_map_keys_values(p)
    torch.testing.assert_close(k_sel, gather_tokens(k_fine, index), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_sel, gather_tokens(v_fine, index), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("topk,threshold", [(1, 1e-6), (8, 1e-6), (30, 1 / 49), (1000, 1e-6)])
@pytest.mark.parametrize("B,heads,fine_hw,coarse_hw", SHAPES)
def test_op_with_projection_matches_reference_and_full_map(backend, topk, threshold, B, heads, fine_hw, coarse_hw):
    q, k, v, *_ = random_inputs(B, heads, fine_hw, coarse_hw)
    p = random_projection(B, heads, fine_hw)
    k_fine, v_fine = full_map_keys_values(p)
    args = (fine_hw, coarse_hw, topk, threshold, backend)
    coarse, fine = pyramid_sparse_attention_parts(q, k, v, None, None, *args, fine_projection=p)
    full_coarse, full_fine = pyramid_sparse_attention_parts(q, k, v, k_fine, v_fine, *args)
    torch.testing.assert_close(fine, full_fine, atol=1e-5, rtol=1e-5)
    k64, v64 = full_map_keys_values(FineProjection(*(t.double() for t in p)))
    expected = reference_psa(q, k, v, k64, v64, fine_hw, coarse_hw, topk, threshold)
    error = ((coarse + fine).double() - expected).abs().max()
    full_error = ((full_coarse + full_fine).double() - expected).abs().max()
    assert error < 1e-4 and error <= 2 * full_error + 1e-6, (error, full_error)  # flash-attention's rule


def test_bad_projection_is_refused():
    q, k, v, *_ = random_inputs(1, 2, (8, 8), (4, 4))
    p = random_projection(1, 2, (8, 8))
    with pytest.raises(ValueError, match=r"fine_projection.weight must be \(2, h, d, C\)"):
        pyramid_sparse_attention_parts(
            q, k, v, None, None, (8, 8), (4, 4), fine_projection=p._replace(weight=p.weight[:, :1])
        )
    with pytest.raises(ValueError, match=r"fine_projection.features must be \(B, C, N\)"):
        pyramid_sparse_attention_parts(
            q, k, v, None, None, (8, 8), (4, 4), fine_projection=p._replace(features=p.features[..., :9])
        )
    with pytest.raises(TypeError, match="FineProjection"):
        pyramid_sparse_attention_parts(q, k, v, None, None, (8, 8), (4, 4), fine_projection=(p.features, p.weight))


# ----------------------------------------------------------------------------------------------------- PSAttn
def calibrated_attn(fine_hw, shared_fine_kv=True, gate=False, seed=0):
    """PSAttn(64, 2) with every BatchNorm's statistics (the fine-map ones included) set from one random batch.

    Untrained statistics shrink features so that the fine branch hides below fp32 rounding; here it moves the
    output visibly (asserted by the tests). The unshared fine K/V conv runs only with the fine branch on, so the
    calibration forward switches it on in training.
    """
    torch.manual_seed(seed)
    attn = PSAttn(64, 2, gate=gate, shared_fine_kv=shared_fine_kv, fine_in_training=not shared_fine_kv)
    up_hw = ((fine_hw[0] + 1) // 2, (fine_hw[1] + 1) // 2)
    x, up = torch.randn(2, 64, *fine_hw) * 3 + 1, torch.randn(2, 64, *up_hw)
    for m in attn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        attn.train()(x, up)
    attn.fine_in_training = False
    return attn.eval(), (x, up)


def fuse_as_ultralytics(attn: PSAttn) -> None:
    """What ``BaseModel.fuse`` does to PSAttn with pst_yolo registered: fold the fine statistics, fuse every Conv."""
    attn.fold_fine_norm()
    for m in attn.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse


def outputs(attn: PSAttn, inputs, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(selected-token path, full-map path, k=0) outputs of attn at top-k ``topk``."""
    with torch.no_grad():
        attn.topk = 0
        coarse = attn(*inputs)
        attn.topk = topk
        selected = attn(*inputs)
        attn.fine_projection = lambda x: None  # the instance attribute shadows the method: full-map path
        try:
            full = attn(*inputs)
        finally:
            del attn.fine_projection
    return selected, full, coarse


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shared_fine_kv,gate", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("fine_hw,topk", [((13, 13), 8), ((10, 6), 8), ((13, 13), 1000)])
def test_psattn_selected_equals_full_map(fused, shared_fine_kv, gate, fine_hw, topk):
    attn, inputs = calibrated_attn(fine_hw, shared_fine_kv, gate)
    if fused:
        fuse_as_ultralytics(attn)
    assert attn.fine_projection(inputs[0]) is not None, "eval BN statistics: the selected-token path runs"
    selected, full, coarse = outputs(attn, inputs, topk)
    scale = full.abs().max()
    assert (full - coarse).abs().max() > 1e-2 * scale, "the fine branch must act"
    torch.testing.assert_close(selected, full, atol=2e-6 * scale, rtol=0)


def test_psattn_selected_as_close_to_float64_as_full_map():
    """flash-attention's rule: at most twice the full-map path's error against the same model in float64."""
    attn, inputs = calibrated_attn((13, 13))
    selected, full, _ = outputs(attn, inputs, 8)
    reference, _, _ = outputs(attn.double(), [t.double() for t in inputs], 8)
    error, full_error = (selected.double() - reference).abs().max(), (full.double() - reference).abs().max()
    assert error <= 2 * full_error + 1e-6, (error, full_error)


def test_batch_statistics_take_the_full_map():
    """With kv's BN in training mode (fine branch trained), its batch statistics need every fine token."""
    attn, (x, _) = calibrated_attn((10, 6))
    attn.kv.bn.train()
    assert attn.fine_projection(x) is None


def test_onnx_graph_projects_selected_tokens_only(tmp_path):
    """TorchScript ONNX export (what Ultralytics uses) of the fused module: the k=8 graph has no more Conv nodes than
    the k=0 one (no 1x1 conv over the fine map) and matches eager PyTorch (and the full-map path) within 1e-4."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    attn, inputs = calibrated_attn((13, 13))
    fuse_as_ultralytics(attn)
    selected, full, _ = outputs(attn, inputs, 8)
    convs = {}
    for topk in (0, 8):
        attn.topk = topk
        path = tmp_path / f"psattn-k{topk}.onnx"
        with torch.no_grad():
            torch.onnx.export(attn, inputs, str(path), opset_version=18, dynamo=False, input_names=["x", "up"])
        convs[topk] = sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = torch.from_numpy(session.run(None, {"x": inputs[0].numpy(), "up": inputs[1].numpy()})[0])
    assert convs[8] == convs[0], convs
    torch.testing.assert_close(exported, selected, atol=1e-4, rtol=0)
    torch.testing.assert_close(exported, full, atol=1e-4, rtol=0)
