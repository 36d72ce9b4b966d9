"""Eq. 3 as a pass over query blocks: the per-key scores of the coarse attention, optionally from a kernel's
log-sum-exp (the ``kernel`` coarse pass: the backend's attention kernel gives eq. 2, this pass gives eq. 3)."""

from __future__ import annotations

import torch

from .export_compat import is_exporting, sum_over_queries

DEFAULT_SCORE_CHUNK = 1 << 22  # elements of the (query chunk x M) probability block alive at once (16 MB in fp32)
CPU_SCORE_CHUNK = 1 << 18  # on CPU a 1 MB fp32 block: the fastest of 2^15 ... 2^19
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def query_chunk_rows(q: torch.Tensor, num_keys: int, max_chunk_elements: int | None) -> int:
    """Rows of q (B, h, N, d) per chunk so that one (B, h, rows, M) block holds at most ``max_chunk_elements``.

    None picks the device's default: ``CPU_SCORE_CHUNK`` on CPU, ``DEFAULT_SCORE_CHUNK`` elsewhere. Exporting, one
    block: a traced loop would bake the chunk count into the graph.
    """
    if is_exporting():
        return q.shape[2]
    if max_chunk_elements is None:
        max_chunk_elements = CPU_SCORE_CHUNK if q.device.type == "cpu" else DEFAULT_SCORE_CHUNK
    batch_heads = q.shape[0] * q.shape[1]
    return max(1, max_chunk_elements // max(1, batch_heads * num_keys))


def key_sums(probs: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    """Probabilities (B, h, rows, M) summed over their queries -> (B, h, M).

    In eager mode rows that are NaN (a non-finite query) add nothing: a NaN query row would otherwise make every
    score of its (batch, head) NaN and drop the fine branch of all the other queries; next to the exp, ``nansum``
    costs as ``sum``. Exporting, the graph form :func:`~pst_yolo.ops.export_compat.sum_over_queries` (``after``: the
    tensor the sum must wait for).
    """
    return sum_over_queries(probs, after) if is_exporting() else probs.nansum(dim=2)


def coarse_key_scores(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, max_chunk_elements: int | None = None
) -> torch.Tensor:
    """Eq. 3: mean over queries of ``softmax(q k^T / sqrt(d))``, one probability per key.

    Computed in query chunks: softmax normalises over keys, so summing per-chunk probabilities is exact, and at most
    a (B, h, rows, M) block with ``B * h * rows * M <= max_chunk_elements`` exists at once. Callers check the
    arguments (:func:`pyramid_sparse_attention_parts` and the public :func:`~pst_yolo.ops.coarse_key_scores`).

    Args:
        q: (B, h, N, d) queries.
        k: (B, h, M, d) keys.
        lse: Optional (B, h, N) row log-sum-exp of the scaled logits (from a fused attention kernel); when given the
            probabilities are ``exp(logits - lse)`` and no softmax is recomputed. The logits are then float32 (as the
            kernel accumulates them): half-precision logits against an fp32 lse would not sum to 1.
        max_chunk_elements: Bound on the elements of one probability block (None: the device's default).

    Returns:
        (B, h, M) float32 scores; each (b, h) row sums to 1 (less the share of NaN query rows, which add nothing).
    """
    n = q.shape[2]
    rows = query_chunk_rows(q, k.shape[2], max_chunk_elements)
    with torch.autocast(q.device.type, enabled=False):
        if lse is None:
            k_t = k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, d, M)
        else:  # float32 base-2 logits, as the kernel's fp32 lse; exp2 is several times faster than exp on CPU
            q, k_t = q.float(), k.float().transpose(-2, -1) * (q.shape[-1] ** -0.5 * LOG2_E)
            lse = lse.float() * LOG2_E  # (B, h, N)
        total = None
        for start in range(0, n, rows):
            lse_block = None if lse is None else lse[:, :, start : start + rows]
            part = _score_block(q[:, :, start : start + rows], k_t, lse_block)
            total = part if total is None else total.add_(part)
    return total / n


def _score_block(q_block: torch.Tensor, k_t: torch.Tensor, lse_block: torch.Tensor | None) -> torch.Tensor:
    """Probabilities of one query block summed over its queries: (B, h, rows, d) -> (B, h, M).

    With ``lse_block`` (B, h, rows) the logits are base 2 (k_t carries log2(e)). The (B, h, rows, M) block lives
    only inside this call, so two blocks never exist at once.
    """
    logits = (q_block @ k_t).float()  # (B, h, rows, M)
    probs = logits.softmax(dim=-1) if lse_block is None else logits.sub_(lse_block[..., None]).exp2_()
    return key_sums(probs)
