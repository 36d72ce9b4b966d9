"""Pure-PyTorch stand-in of ``flash_attn.flash_attn_func`` (flash-attn 2.8.x), for tests without a GPU.

Mirrors github.com/Dao-AILab/flash-attention at tag v2.8.3:
- ``flash_attn/flash_attn_interface.py``: ``flash_attn_func`` (signature and defaults, ``softmax_scale=None`` means
  ``headdim ** -0.5``, ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``), ``FlashAttnFunc.forward``
  (head dims not a multiple of 8 are zero-padded and the output sliced back; ``return_softmax`` is passed as
  ``return_attn_probs and dropout_p > 0``, so with no dropout ``S_dmask`` is an empty tensor) and
  ``_flash_attn_forward_fake`` (``softmax_lse`` is (batch, nheads, seqlen_q) float32);
- ``csrc/flash_attn/flash_api.cpp``: ``mha_fwd`` refusals, as RuntimeError with the same messages: fp16/bf16 only,
  q/k/v of one dtype, head dim at most 256, nheads divisible by nheads_k, positive batch, k and v shaped
  (batch, seqlen_k, nheads_k, headdim). Layout (batch, seqlen, nheads, headdim); seqlen_q and seqlen_k may differ.

Numerics follow the kernel: q k^T accumulated in fp32, softmax statistics in fp32, the probabilities rounded to the
input dtype before the P V product (fp32 accumulation), the output rounded to the input dtype. The lse is the natural
log-sum-exp of each row of ``q k^T * softmax_scale``. Gradients flow (the real function has a backward pass).
Not mirrored: the refusal of non-CUDA tensors and of pre-Ampere GPUs (this stand-in exists to run on the CPU), and
the features pst_yolo never uses (dropout, causal, sliding window, softcap, ALiBi), which raise NotImplementedError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)  # what TORCH_CHECK raises in Python


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """softmax(q k^T * softmax_scale) v; q (B, N, h, d), k/v (B, M, h_k, d) -> out (B, N, h, d).

    Returns:
        out, or (out, softmax_lse (B, h, N) float32, S_dmask empty) with ``return_attn_probs=True``.
    """
    if dropout_p or causal or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("flash_attn stand-in: dropout, causal, window, softcap and ALiBi are not modelled")
    _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k.dtype == q.dtype, "query and key must have the same dtype")
    _check(v.dtype == q.dtype, "query and value must have the same dtype")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    batch, _, nheads, head_size_og = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    _check(batch > 0, "batch size must be positive")
    _check(head_size_og <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(nheads % nheads_k == 0, "Number of heads in key/value must divide number of heads in query")
    shape_k = (batch, seqlen_k, nheads_k, head_size_og)
    _check(tuple(k.shape) == shape_k, f"k must have shape {shape_k}")
    _check(tuple(v.shape) == shape_k, f"v must have shape {shape_k}")
    pad = (8 - head_size_og % 8) % 8
    if pad:  # FlashAttnFunc.forward pads the head dim to a multiple of 8
        q, k, v = (F.pad(t, [0, pad]) for t in (q, k, v))

    groups = nheads // nheads_k
    qh = q.transpose(1, 2).float()  # (B, h, N, d)
    kh = k.transpose(1, 2).float().repeat_interleave(groups, dim=1)  # (B, h, M, d)
    vh = v.transpose(1, 2).float().repeat_interleave(groups, dim=1)
    logits = (qh @ kh.transpose(-2, -1)) * softmax_scale  # (B, h, N, M), fp32 accumulation
    softmax_lse = torch.logsumexp(logits, dim=-1)  # (B, h, N) fp32, natural log
    probs = torch.exp(logits - softmax_lse[..., None]).to(q.dtype)  # P rounded to the input dtype
    out = (probs.float() @ vh).to(q.dtype).transpose(1, 2)[..., :head_size_og]  # (B, N, h, d)
    if not return_attn_probs:
        return out
    s_dmask = torch.empty((0,), dtype=q.dtype, device=q.device)  # return_softmax is False without dropout
    return out, softmax_lse.detach(), s_dmask
