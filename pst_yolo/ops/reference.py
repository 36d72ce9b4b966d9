"""The Pyramid Sparse Attention of the paper (Section 3.1, eq. 1-6), written to be read: plain PyTorch, dense.

This is the definition the fast paths are tested against (``tests/``); nothing in the package runs it. Notation:
a fine map X of H x W tokens (N = H * W) and its upper map U of Hu x Wu = ceil(H/2) x ceil(W/2) tokens (M = Hu * Wu),
h heads of d channels each. Coarse token m = (i, j) has the fine children (2i + a, 2j + b), a, b in {0, 1}; children
outside an odd-sized fine map do not exist (masked, never clamped).

- :func:`pyramid_sparse_attention_reference`: eq. 2-5 on given q, k, v and fine k, v.
- :func:`psa_layer_reference`: eq. 1 and eq. 6 around it, from 1x1-conv weights (BatchNorm folded in, as after
  Ultralytics' ``fuse()``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def pyramid_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fine: torch.Tensor,
    v_fine: torch.Tensor,
    fine_hw: tuple[int, int],
    coarse_hw: tuple[int, int],
    topk: int = 8,
    threshold: float = 1e-6,
    dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """O = O_coarse + O_fine (eq. 2-5) for q (B, h, N, d), k/v (B, h, M, d), k_fine/v_fine (B, h, N, d).

    Returns:
        (B, h, N, d) in ``dtype`` (None: the inputs' dtype).
    """
    if dtype is not None:
        q, k, v, k_fine, v_fine = (t.to(dtype) for t in (q, k, v, k_fine, v_fine))
    (H, W), (_, Wu) = fine_hw, coarse_hw
    d = q.shape[-1]
    # eq. 2: coarse attention of every fine query over the M upper tokens
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, h, N, M)
    out_coarse = probs @ v  # (B, h, N, d)
    if topk == 0:
        return out_coarse
    # eq. 3: one score per upper token, the mean over queries of its attention probability
    scores = probs.mean(dim=2)  # (B, h, M), each row sums to 1
    # eq. 4: the top-k upper tokens above the threshold, their 2x2 fine children, and those children's fine K/V
    top_scores, top = scores.topk(min(topk, scores.shape[-1]), dim=-1)  # (B, h, k)
    row, col = top // Wu, top % Wu
    child_row = 2 * row[..., None] + torch.tensor([0, 0, 1, 1])  # (B, h, k, 4)
    child_col = 2 * col[..., None] + torch.tensor([0, 1, 0, 1])
    exists = (child_row < H) & (child_col < W) & (top_scores > threshold)[..., None]  # (B, h, k, 4)
    index = (child_row * W + child_col).clamp(max=H * W - 1).flatten(-2)  # (B, h, 4k), only read where it exists
    k_sel = k_fine.gather(2, index[..., None].expand(-1, -1, -1, d))  # (B, h, 4k, d)
    v_sel = v_fine.gather(2, index[..., None].expand(-1, -1, -1, d))
    # eq. 5: fine attention of every query over the selected children only
    logits = q @ k_sel.transpose(-2, -1) / math.sqrt(d)  # (B, h, N, 4k)
    logits = logits.masked_fill(~exists.flatten(-2)[:, :, None, :], -math.inf)
    out_fine = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v_sel  # a head with nothing selected adds 0
    return out_coarse + out_fine


class PSALayerWeights(NamedTuple):
    """1x1-conv weights (out, in, 1, 1) and biases (out,) of one PSA layer with its BatchNorms folded in.

    ``kv`` projects the upper map (eq. 1), ``kv_fine`` the fine map (eq. 4's K_fine, V_fine: the shared projection
    with the fine map's own BatchNorm statistics); their output channels are K then V, each grouped per head.
    ``pe`` is the 7x7 depthwise conv (C, 1, 7, 7) of the CPE, ``proj`` the output conv (eq. 6).
    """

    q: tuple[torch.Tensor, torch.Tensor]
    kv: tuple[torch.Tensor, torch.Tensor]
    kv_fine: tuple[torch.Tensor, torch.Tensor]
    pe: tuple[torch.Tensor, torch.Tensor]
    proj: tuple[torch.Tensor, torch.Tensor]


def psa_layer_reference(
    x: torch.Tensor, up: torch.Tensor, weights: PSALayerWeights, num_heads: int, topk: int = 8, threshold: float = 1e-6
) -> torch.Tensor:
    """One PSA layer: eq. 1, eq. 2-5 (:func:`pyramid_sparse_attention_reference`) and eq. 6.

    Args:
        x: (B, C, H, W) fine map; up: (B, C, ceil(H/2), ceil(W/2)) upper map.
        weights: The layer's folded conv weights.
        num_heads: h; C = h * d.

    Returns:
        (B, C, H, W) in x's dtype.
    """
    B, C, H, W = x.shape
    Hu, Wu = up.shape[2:]
    d = C // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, C, h', w') -> (B, h, h' * w', d)
        return t.flatten(2).view(B, num_heads, d, -1).transpose(-2, -1)

    # eq. 1: Q from the fine map, K and V from the upper map (one 1x1 conv each; here K and V share one conv)
    q = heads(F.conv2d(x, *weights.q))  # (B, h, N, d)
    k, v = F.conv2d(up, *weights.kv).chunk(2, dim=1)  # (B, C, Hu, Wu) each
    k_fine, v_fine = F.conv2d(x, *weights.kv_fine).chunk(2, dim=1)  # (B, C, H, W) each
    out = pyramid_sparse_attention_reference(
        q, heads(k), heads(v), heads(k_fine), heads(v_fine), (H, W), (Hu, Wu), topk, threshold, dtype=None
    )  # (B, h, N, d)
    out = out.transpose(-2, -1).reshape(B, C, H, W)
    # eq. 6: O = Conv1x1(O_coarse + O_fine + Upsample(DConv7x7(V)))
    cpe = F.conv2d(v, *weights.pe, padding=3, groups=C)
    cpe = F.interpolate(cpe, size=(H, W), mode="bilinear", align_corners=False)
    return F.conv2d(out + cpe, *weights.proj)
