"""Eq. 2 and eq. 3 in one pass over query blocks (the ``fused`` coarse pass): each probability block gives its output
rows and its key sums, so the q k^T product and the exp are shared and at most one (B, h, rows, M) block exists.

The default coarse pass on the CPU and while exporting (:func:`~pst_yolo.ops.pyramid_sparse_attention.
default_coarse_pass`): against the backend's attention kernel followed by a separate eq. 3 pass it saves 10% of
YOLO11n-PST's latency at k=8 (640 px, 1 thread, CPU time; median of 3 runs, 9-15%).
"""

from __future__ import annotations

import torch

from .export_compat import is_exporting, traced_query_blocks
from .score_pass import key_sums, query_chunk_rows


def blocked_attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_chunk_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 (``softmax(q k^T / sqrt(d)) v``) and eq. 3 (its mean over queries) over query blocks.

    Args:
        q: (B, h, N, d) queries; k, v: (B, h, M, d) coarse keys/values.
        max_chunk_elements: Bound on the elements of one probability block (None: the device's default).

    Returns:
        out (B, h, N, d) and scores (B, h, M) float32.
    """
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5
    if is_exporting():  # one block, or the blocks of a traced graph
        k_t = k.transpose(-2, -1) * scale  # (B, h, d, M), scaled once instead of every query block
        outs, scores = zip(*(_attention_block(block, k_t, v) for block in traced_query_blocks(q, k.shape[2])))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out, sum(scores[1:], scores[0]) / n
    rows = min(n, query_chunk_rows(q, k.shape[2], max_chunk_elements))
    k_t = k.transpose(-2, -1) * scale
    out, total = None, None
    for start in range(0, n, rows):
        part, part_scores = _attention_block(q[:, :, start : start + rows], k_t, v)
        if out is None:  # allocated from the first block: its dtype follows autocast
            out, total = part.new_empty(q.shape[:-1] + v.shape[-1:]), part_scores
        else:
            total += part_scores
        out[:, :, start : start + rows] = part
    return out, total / n


def _attention_block(q_block: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows (B, h, rows, d) and probabilities summed over the block's queries (B, h, M) of one query block."""
    probs = (q_block @ k_t).softmax(dim=-1)  # (B, h, rows, M), eq. 2
    out = probs @ v
    return out, key_sums(probs.detach().float(), after=out.detach())  # eq. 3, before the mean
