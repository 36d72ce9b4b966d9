"""PSAttn / PSAttnBlock / PST modules: train-coarse/infer-fine, gradients, sizes, BN statistics, fusing."""

import pytest
import torch
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from pst_yolo import PST, PSAttn, set_topk


def pst_inputs(B=2, c1=48, c_up=80, fine_hw=(13, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    up_hw = ((fine_hw[0] + 1) // 2, (fine_hw[1] + 1) // 2)
    return [torch.randn(B, c1, *fine_hw, generator=g), torch.randn(B, c_up, *up_hw, generator=g)]


def expected_params(c1, c_up, c2, e, n, mlp_ratio):
    """The formula stated in PST's docstring."""
    c_ = int(c2 * e)
    hidden = int(c_ * mlp_ratio)
    return (c1 + c_up + 4) * c_ + n * (4 * c_**2 + 2 * hidden * c_ + 61 * c_ + 2 * hidden) + (n + 1) * c_ * c2 + 2 * c2


@pytest.mark.parametrize(
    "c1,c_up,c2,e,n,mlp_ratio", [(48, 80, 64, 0.5, 1, 2.0), (128, 256, 256, 0.5, 2, 2.0), (64, 64, 96, 1 / 3, 3, 1.5)]
)
def test_param_count_formula(c1, c_up, c2, e, n, mlp_ratio):
    module = PST(c1, c_up, c2, n=n, mlp_ratio=mlp_ratio, e=e)
    assert sum(p.numel() for p in module.parameters()) == expected_params(c1, c_up, c2, e, n, mlp_ratio)


@pytest.mark.parametrize("c2,e", [(48, 0.5), (64, 0.25), (0, 0.5)])
def test_token_dim_must_be_multiple_of_32(c2, e):
    with pytest.raises(ValueError, match="multiple of 32"):
        PST(32, 32, c2, e=e)


def test_train_is_coarse_only_eval_uses_topk():
    torch.manual_seed(0)
    module = PST(48, 80, 64, k=8)
    x = pst_inputs()
    attn = module.blocks[0].attn
    module.train()
    assert attn.active_topk() == 0
    module.eval()
    assert attn.active_topk() == 8
    fine = module(x)
    assert set_topk(module, 0) == 1
    coarse = module(x)
    assert not torch.allclose(fine, coarse), "fine attention must change the output"
    assert torch.equal(module(x), coarse)
    set_topk(module, 8)
    assert torch.equal(module(x), fine), "eval is deterministic"
    with pytest.raises(ValueError):
        set_topk(module, -1)


def test_override_topk_is_process_wide():
    module = PST(48, 80, 64, k=8).eval()
    x = pst_inputs()
    fine = module(x)
    try:
        PSAttn.override_topk(0)
        coarse = module(x)
    finally:
        PSAttn.override_topk(None)
    set_topk(module, 0)
    assert torch.equal(coarse, module(x)) and not torch.equal(coarse, fine)


def test_gradients_reach_every_training_parameter():
    torch.manual_seed(0)
    module = PST(48, 80, 64, n=2).train()
    module(pst_inputs()).square().mean().backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing}"


def test_fine_in_training_trains_the_fine_branch():
    torch.manual_seed(0)
    module = PST(48, 80, 64, k=4, fine_in_training=True, gate=True).train()
    module(pst_inputs()).square().mean().backward()
    assert module.blocks[0].attn.gate.weight.grad.abs().sum() > 0


def test_fine_kv_uses_fine_map_statistics():
    """Training tracks the kv conv's statistics on the fine map; eval normalises fine K/V with them."""
    torch.manual_seed(0)
    attn = PSAttn(64, 2)
    x, up = torch.randn(4, 64, 10, 10) * 3 + 1, torch.randn(4, 64, 5, 5)
    attn.kv.bn.momentum = 1.0  # running stats = last batch, to compare exactly
    attn.train()(x, up)
    raw_fine = attn.kv.conv(x).detach()
    torch.testing.assert_close(attn.fine_kv_mean, raw_fine.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    attn.eval()
    bn = attn.kv.bn
    expected = (raw_fine - attn.fine_kv_mean[:, None, None]) / (attn.fine_kv_var[:, None, None] + bn.eps).sqrt()
    expected = expected * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(attn.fine_keys_values(x), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(attn.fine_keys_values(x), attn.kv(x), atol=1e-2), "upper-map stats differ from fine"


def test_fold_fine_norm_matches_unfused():
    """After kv's BN is fused (as Ultralytics' fuse does), the folded fine affine reproduces the fine K/V."""
    torch.manual_seed(0)
    attn = PSAttn(64, 2)
    for _ in range(3):
        attn.train()(torch.randn(2, 64, 10, 10) * 2 + 0.5, torch.randn(2, 64, 5, 5))
    attn.eval()
    x, up = torch.randn(1, 64, 10, 10), torch.randn(1, 64, 5, 5)
    before, fine_before = attn(x, up), attn.fine_keys_values(x)
    attn.fold_fine_norm()
    attn.kv.conv = fuse_conv_and_bn(attn.kv.conv, attn.kv.bn)
    del attn.kv.bn
    attn.kv.forward = attn.kv.forward_fuse
    torch.testing.assert_close(attn.fine_keys_values(x), fine_before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(attn(x, up), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fine_hw", [(13, 13), (10, 6), (8, 8)])
def test_odd_sizes_forward(fine_hw):
    module = PST(48, 80, 64, k=8).eval()
    out = module(pst_inputs(fine_hw=fine_hw))
    assert out.shape == (2, 64, *fine_hw) and torch.isfinite(out).all()


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    module = PST(48, 80, 64, k=8).eval()
    x = pst_inputs()
    ref = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_inputs():
    module = PST(48, 80, 64).eval()
    fine, up = pst_inputs()
    with pytest.raises(TypeError, match="list"):
        module(fine)
    with pytest.raises(ValueError, match="half"):
        module([fine, torch.randn(2, 80, 4, 4)])
