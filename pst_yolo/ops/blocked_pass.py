"""Eq. 2 and eq. 3 in one pass over query blocks (the ``fused`` coarse pass): each probability block gives its output
rows and its key sums, so the q k^T product and the exp are shared and at most one (B, h, rows, M) block exists.

The default coarse pass on the CPU and while exporting (:func:`~pst_yolo.ops.pyramid_sparse_attention.
default_coarse_pass`). Two CPU fast paths sit inside it, each measured at model level: one reused block buffer
(:func:`_block_workspace`) and base-2 exponentials with the normalisation moved off the block (:func:`_base2_pass`).
"""

from __future__ import annotations

import torch

from .export_compat import is_exporting, traced_query_blocks
from .score_pass import LOG2_E, coarse_key_scores, key_sums, query_chunk_rows


def blocked_attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_chunk_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 (``softmax(q k^T / sqrt(d)) v``) and eq. 3 (its mean over queries) over query blocks.

    Without autograd and autocast, float32/float64 blocks on the CPU run in base 2 (:func:`_base2_pass`).

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
    workspace = _block_workspace(q, k.transpose(-2, -1), rows)
    if workspace is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        out, scores = _base2_pass(q, k.transpose(-2, -1) * (scale * LOG2_E), v, rows, workspace)
        if scores.isnan().any():  # a non-finite query row: the key sums again without it (key_sums drops it)
            scores = coarse_key_scores(q, k, max_chunk_elements=max_chunk_elements)
        return out, scores
    k_t = k.transpose(-2, -1) * scale
    out, total = None, None
    for start in range(0, n, rows):
        part, part_scores = _attention_block(q[:, :, start : start + rows], k_t, v, workspace)
        if out is None:  # allocated from the first block: its dtype follows autocast
            out, total = part.new_empty(q.shape[:-1] + v.shape[-1:]), part_scores
        else:
            total += part_scores
        out[:, :, start : start + rows] = part
    return out, total / n


def _block_workspace(q: torch.Tensor, k_t: torch.Tensor, rows: int) -> torch.Tensor | None:
    """One (B * h * rows * M) buffer that every query block of one pass reuses for its logits, then probabilities.

    A fresh block of this size (1 MB on CPU) is above glibc's mmap threshold: it is mapped on allocation and unmapped
    when freed, so each block would pay its page faults again, and a separate softmax output doubles the memory each
    block streams through. At 640 px P3 with one thread the pass took 1.5-2.2x one bare SDPA call with fresh blocks,
    1.39-1.48x with this buffer. None where the blocks must stay alive or be cast: while autograd records them
    (backward needs each block's probabilities) or under autocast.
    """
    records = torch.is_grad_enabled() and (q.requires_grad or k_t.requires_grad)
    if records or torch.is_autocast_enabled(q.device.type):
        return None
    B, h, _, M = k_t.shape
    return q.new_empty(B * h * rows * M, dtype=torch.result_type(q, k_t))


def _attention_block(
    q_block: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, workspace: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows (B, h, rows, d) and probabilities summed over the block's queries (B, h, M) of one query block.

    With ``workspace`` (from :func:`_block_workspace`) the logits are written into it and softmax-ed in place.
    """
    if workspace is None:
        probs = (q_block @ k_t).softmax(dim=-1)  # (B, h, rows, M), eq. 2
    else:
        probs = _workspace_block(workspace, q_block, k_t)
        torch.softmax(torch.matmul(q_block, k_t, out=probs), dim=-1, out=probs)
    out = probs @ v
    return out, key_sums(probs.detach().float(), after=out.detach())  # eq. 3, before the mean


def _base2_pass(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, rows: int, workspace: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blocked_attention_with_scores` on the CPU without autograd, from base-2 logits (``k_t`` carries
    log2(e)), one ``rows``-query block after the other in ``workspace``.

    Each block holds ``exp2(logits - row max)``, unnormalised: exp2 is cheaper than exp on the CPU, and the division
    by the row sums moves to the (rows, d) output rows and into the key sums, one product of the inverse row sums with
    the block, so no pass over the block normalises it (640 px P3, 1 thread: 1.25-1.37x one bare SDPA call, against
    1.35-1.46x with softmax-ed blocks). A NaN query row makes every key sum NaN (the caller recomputes them without
    it).

    Args:
        q: (B, h, N, d) queries; k_t: (B, h, d, M) keys, transposed and scaled by log2(e) / sqrt(d); v: (B, h, M, d).

    Returns:
        out (B, h, N, d) and scores (B, h, M) float32.
    """
    n = q.shape[2]
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    sums = None
    for start in range(0, n, rows):
        q_block = q[:, :, start : start + rows]
        probs = torch.matmul(q_block, k_t, out=_workspace_block(workspace, q_block, k_t))  # (B, h, rows, M)
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp2_()  # each row's largest entry is 1: no overflow, sum >= 1
        inverse_sums = probs.sum(dim=-1, keepdim=True).reciprocal_()  # (B, h, rows, 1)
        torch.matmul(probs, v, out=out[:, :, start : start + rows]).mul_(inverse_sums)  # eq. 2
        part = inverse_sums.transpose(-2, -1) @ probs  # (B, h, 1, M): eq. 3 before the mean
        sums = part if sums is None else sums.add_(part)
    return out, sums.squeeze(-2).float() / n


def _workspace_block(workspace: torch.Tensor, q_block: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
    """The (B, h, rows, M) block of ``workspace`` for the logits of ``q_block`` (the last block may have fewer rows)."""
    shape = q_block.shape[:-1] + k_t.shape[-1:]
    return workspace[: shape.numel()].view(shape)
