"""Pure-PyTorch stand-in of ``sageattention.sageattn`` (sageattention 1.0.6, the newest release on PyPI).

Mirrors github.com/thu-ml/SageAttention at commit 0db4cbf ("enable pip install sageattention==1.0.6"; identical to
the PyPI wheel sageattention-1.0.6-py3-none-any.whl):
- ``sageattention/core.py``: ``sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None,
  smooth_k=True, **kwargs)`` and its assertions (AssertionError with the same messages): dtype float16, bfloat16 or
  float32; q/k/v on one device with one dtype; head dim 64, 96 or 128; last dimension contiguous. ``smooth_k``
  subtracts the mean key over the sequence **in place** (``k -= km``: the caller's tensor changes); v is cast to
  float16 for bf16/fp32 inputs; the output has q's dtype and layout.
- ``sageattention/quant_per_block.py``: ``per_block_int8``: q (pre-multiplied by ``sm_scale * log2(e)``) and k are
  quantised to int8 per block of 128 queries / 64 keys, scale = max|x| / 127, rounding half away from zero.
- ``sageattention/attn_qk_int8_per_block.py``: ``_attn_fwd_inner``: base-2 softmax over keys in blocks of 64, P
  rounded to float16, the P V product of each block accumulated in float16 (modelled with the global row maximum
  instead of the running one). Its masked key loads have no ``other``
  and the logits of the last block are not masked, so with ``kv_len % 64 != 0`` the padding slots join the softmax
  (logit 0, value 0). Modelled here with the padding read as zeros, which is what the real kernel gives under
  ``TRITON_INTERPRET=1`` (49 keys: outputs about 15% too small against float64).
- No backward: the kernels write into ``torch.empty`` outputs outside autograd, so the result never requires grad.
Not mirrored: the refusal of non-CUDA tensors (``assert q.is_cuda``; this stand-in exists to run on the CPU) and the
causal kernels (NotImplementedError).
"""

from __future__ import annotations

from typing import Any

import torch

LOG2_E = 1.44269504  # the constant per_block_int8 multiplies sm_scale by
BLOCK_Q, BLOCK_K = 128, 64  # per_block_int8's BLKQ/BLKK and the attention kernel's BLOCK_M/BLOCK_N


def _quantize_per_block(x: torch.Tensor, block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, h, L, d) * scale -> int8 values (as float32) and one float32 scale per block of ``block`` rows."""
    b, h, length, d = x.shape
    blocks = -(-length // block)
    padded = torch.zeros(b, h, blocks * block, d, dtype=torch.float32, device=x.device)
    padded[:, :, :length] = x.float() * scale
    padded = padded.view(b, h, blocks, block, d)
    step = padded.abs().amax(dim=(-2, -1), keepdim=True) / 127.0  # (B, h, blocks, 1, 1)
    scaled = padded / step
    values = torch.trunc(scaled + 0.5 * torch.where(scaled >= 0, 1.0, -1.0))  # the kernel's round-then-cast
    return values.view(b, h, blocks * block, d)[:, :, :length], step


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal=False,
    sm_scale: float | None = None,
    smooth_k: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """SageAttention 1.0.6 forward; q (B, h, N, d), k/v (B, h_kv, M, d) with ``HND`` ((B, N, h, d) with ``NHD``).

    Returns:
        Output in q's layout and dtype, never requiring grad.
    """
    dtype = q.dtype
    assert dtype in [torch.float16, torch.bfloat16, torch.float32], (
        "Input tensors must be in dtype of torch.float16, torch.bfloat16, or torch.float32."
    )
    assert q.device == k.device == v.device, "All tensors must be on the same device."
    assert q.dtype == k.dtype == v.dtype, "All tensors must have the same dtype."
    headdim = q.size(-1)
    assert headdim in [64, 96, 128], "headdim should be in [64, 96, 128]."
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
    if tensor_layout not in ("HND", "NHD"):
        raise ValueError(f"Unknown tensor layout: {tensor_layout}")
    if is_causal:
        raise NotImplementedError("sageattention stand-in: the causal kernels are not modelled")
    if sm_scale is None:
        sm_scale = headdim**-0.5
    seq_dim = 1 if tensor_layout == "NHD" else 2
    if smooth_k:
        km = k.mean(dim=seq_dim, keepdim=True)
        k -= km  # in place, as upstream
    if dtype == torch.bfloat16 or dtype == torch.float32:
        v = v.to(torch.float16)

    with torch.no_grad():
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q_int, q_step = _quantize_per_block(q, BLOCK_Q, sm_scale * LOG2_E)
        k_int, k_step = _quantize_per_block(k, BLOCK_K, 1.0)
        groups = q.shape[1] // k.shape[1]
        k_int, k_step, v = (t.repeat_interleave(groups, dim=1) for t in (k_int, k_step, v))
        kv_len = k.shape[2]
        key_blocks = k_step.shape[2]
        padding = key_blocks * BLOCK_K - kv_len  # unmasked slots of the last key block: logit 0, value 0
        k_int = torch.nn.functional.pad(k_int, (0, 0, 0, padding))
        v = torch.nn.functional.pad(v, (0, 0, 0, padding))
        logits = q_int @ k_int.transpose(-2, -1)  # (B, h, N, blocks * 64): exact integer products
        q_scale = q_step.repeat_interleave(BLOCK_Q, dim=2)[:, :, : q.shape[2], 0]  # (B, h, N, 1)
        k_scale = k_step.repeat_interleave(BLOCK_K, dim=2)[..., 0].transpose(-2, -1)  # (B, h, 1, blocks * 64)
        logits = logits * q_scale * k_scale  # base-2 logits
        probs = torch.exp2(logits - logits.amax(dim=-1, keepdim=True))
        denominator = probs.sum(dim=-1, keepdim=True)
        probs = probs.to(torch.float16).view(*probs.shape[:-1], key_blocks, BLOCK_K)
        v_blocks = v.view(*v.shape[:2], key_blocks, BLOCK_K, v.shape[-1])
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for block in range(key_blocks):  # each block's P V rounded to float16, as out_dtype=tl.float16
            out += (probs[..., block, :].float() @ v_blocks[:, :, block].float()).to(torch.float16).float()
        out = (out / denominator).to(dtype)
        if tensor_layout == "NHD":
            out = out.transpose(1, 2)
    return out
