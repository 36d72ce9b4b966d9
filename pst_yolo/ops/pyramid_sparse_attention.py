"""Pyramid Sparse Attention (paper Section 3.1, eq. 2-5) as pure tensor functions.

Notation: a fine map of H x W tokens (N = H * W) and an upper (coarse) map of Hu x Wu tokens (M = Hu * Wu) with
Hu = ceil(H / 2) and Wu = ceil(W / 2). Coarse token (i, j) has the fine children (2i + a, 2j + b), a, b in {0, 1};
children that fall outside an odd-sized fine map are masked out, never clamped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..validation import (
    check_choice,
    check_grid,
    check_int,
    check_number,
    check_pyramid_attention_call,
    check_score_pass_call,
    check_shape,
    check_tensor,
    check_type,
)
from .backends import (
    BACKENDS,
    attention,
    is_exporting,
    is_exporting_graph,
    last_dim_contiguous,
    naive_attention,
    resolve_backend,
    traced_query_blocks,
)

DEFAULT_SCORE_CHUNK = 1 << 22  # elements of the (query chunk x M) probability block alive at once (16 MB in fp32)
CPU_SCORE_CHUNK = 1 << 18  # on CPU a 1 MB fp32 block: the fastest of 2^15 ... 2^19 (docs/BENCHMARKS.md)
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
# Logit offset of a masked fine token (eq. 5): exp(-1e4) is 0 in every float type, and the constant is finite in
# float16. dtype-derived extremes are not: the fp32 graph's finfo.min / 2 (-1.7e38) becomes -inf in a TensorRT fp16
# engine, and (1 - valid) * -inf is NaN for every valid token.
MASKED_LOGIT = -1.0e4
COARSE_PASSES = ("fused", "kernel")  # see coarse_attention_with_scores


def _query_chunk_rows(q: torch.Tensor, num_keys: int, max_chunk_elements: int | None) -> int:
    """Rows of q per chunk so that one (B, h, rows, M) block holds at most ``max_chunk_elements`` elements.

    None picks the device's default: ``CPU_SCORE_CHUNK`` on CPU, ``DEFAULT_SCORE_CHUNK`` elsewhere.
    """
    if is_exporting():  # one block: a traced loop would bake the chunk count into the graph
        return q.shape[2]
    if max_chunk_elements is None:
        max_chunk_elements = CPU_SCORE_CHUNK if q.device.type == "cpu" else DEFAULT_SCORE_CHUNK
    batch_heads = q.shape[0] * q.shape[1]
    return max(1, max_chunk_elements // max(1, batch_heads * num_keys))


def _sum_over_queries(probs: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, rows, M) -> (B, h, M); in eager mode rows that are NaN (a non-finite query) add nothing.

    A NaN query row would otherwise make every score of its (batch, head) NaN and drop the fine branch of all the
    other queries (docs/DESIGN.md, "Bad inputs and non-finite values"); next to the exp, ``nansum`` costs as ``sum``.

    Exporting, the sum is a product with a (B, h, 1, rows) ones vector: ONNX Runtime runs ReduceSum over a middle
    axis ~10x slower. ``after`` (B, h, rows, d), a tensor the sum must wait for (the block's attention output): the
    ones are then made from it (its first column clamped to 1; a NaN row stays NaN, as the product makes it anyway).
    ONNX Runtime orders a graph's nodes by a depth-first walk back from its outputs; without that dependency it runs
    every block's logits, softmax and key sums before any block's ``p v``, which then reads each block back from
    memory instead of cache (docs/BENCHMARKS.md, runs O to Q).
    """
    if not is_exporting():
        return probs.nansum(dim=2)
    if after is None:  # full_like with an explicit dtype: x2paddle has no ones_like, CoreML no new_ones
        ones = torch.full_like(probs[..., 0], 1.0, dtype=probs.dtype).unsqueeze(-2)
    else:
        ones = after[..., 0].to(probs.dtype).unsqueeze(-2).clamp(1.0, 1.0)
    return (ones @ probs).squeeze(-2)


def coarse_key_scores(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, max_chunk_elements: int | None = None
) -> torch.Tensor:
    """Eq. 3: mean over queries of ``softmax(q k^T / sqrt(d))``, one probability per key.

    Computed in query chunks: softmax normalises over keys, so summing per-chunk probabilities is exact, and at most
    a (B, h, rows, M) block with ``B * h * rows * M <= max_chunk_elements`` exists at once.

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
    if not is_exporting():
        check_score_pass_call("coarse_key_scores", q, k, lse=lse, max_chunk_elements=max_chunk_elements)
    n = q.shape[2]
    rows = _query_chunk_rows(q, k.shape[2], max_chunk_elements)
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
    return _sum_over_queries(probs)


def blocked_attention_with_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_chunk_elements: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 and eq. 3 in one pass over query blocks: each probability block gives its output rows and key sums.

    The exp and the q k^T product are shared by the output and the scores, and at most one (B, h, rows, M) block
    (and its softmax) exists at once. Without autograd and autocast, float32/float64 blocks on the CPU run in base 2
    (:func:`_base2_pass`).

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
    rows = min(n, _query_chunk_rows(q, k.shape[2], max_chunk_elements))
    workspace = _block_workspace(q, k.transpose(-2, -1), rows)
    if workspace is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        out, scores = _base2_pass(q, k.transpose(-2, -1) * (scale * LOG2_E), v, rows, workspace)
        if scores.isnan().any():  # a non-finite query row: the key sums again without it (_sum_over_queries)
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
    block streams through. Measured at 640 px P3 with one thread (``scripts/score_pass_spread.py``, docs/BENCHMARKS.md):
    89-131 ms per pass with fresh blocks (1.5-2.2x one bare SDPA call, varying from process to process), 81-88 ms
    (1.39-1.48x) with this buffer. None where the blocks must stay alive or be cast: while autograd records them
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
        probs = (q_block @ k_t).softmax(dim=-1)  # (B, h, rows, M)
    else:
        probs = _workspace_block(workspace, q_block, k_t)
        torch.softmax(torch.matmul(q_block, k_t, out=probs), dim=-1, out=probs)
    out = probs @ v
    return out, _sum_over_queries(probs.detach().float(), after=out.detach())


def _base2_pass(
    q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, rows: int, workspace: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`blocked_attention_with_scores` on the CPU without autograd, from base-2 logits (``k_t`` carries
    log2(e)), one ``rows``-query block after the other in ``workspace``.

    Each block holds ``exp2(logits - row max)``, unnormalised: exp2 is cheaper than exp on the CPU, and the division
    by the row sums moves to the (rows, d) output rows and into the key sums, one product of the inverse row sums with
    the block, so no pass over the block normalises it (640 px P3, 1 thread: 1.25-1.37x one bare SDPA call, against
    1.35-1.46x with softmax-ed blocks; docs/BENCHMARKS.md). A NaN query row makes every key sum NaN (the caller
    recomputes them without it).

    Args:
        q: (B, h, N, d) queries; k_t: (B, h, d, M) keys, transposed and scaled by log2(e) / sqrt(d); v: (B, h, M, d).

    Returns:
        out (B, h, N, d) and scores (B, h, M) float32.
    """
    n = q.shape[2]
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    key_sums = None
    for start in range(0, n, rows):
        q_block = q[:, :, start : start + rows]
        probs = torch.matmul(q_block, k_t, out=_workspace_block(workspace, q_block, k_t))  # (B, h, rows, M)
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp2_()  # each row's largest entry is 1: no overflow, sum >= 1
        inverse_sums = probs.sum(dim=-1, keepdim=True).reciprocal_()  # (B, h, rows, 1)
        torch.matmul(probs, v, out=out[:, :, start : start + rows]).mul_(inverse_sums)
        part = inverse_sums.transpose(-2, -1) @ probs  # (B, h, 1, M)
        key_sums = part if key_sums is None else key_sums.add_(part)
    return out, key_sums.squeeze(-2).float() / n


def _workspace_block(workspace: torch.Tensor, q_block: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
    """The (B, h, rows, M) block of ``workspace`` for the logits of ``q_block`` (the last block may have fewer rows)."""
    shape = q_block.shape[:-1] + k_t.shape[-1:]
    return workspace[: shape.numel()].view(shape)


def _checked_coarse_pass(coarse_pass: str | None) -> str | None:
    if coarse_pass is not None and coarse_pass not in COARSE_PASSES:
        raise ValueError(f"coarse_pass must be one of {', '.join(COARSE_PASSES)} or None, got {coarse_pass!r}.")
    return coarse_pass


def default_coarse_pass(q: torch.Tensor, backend: str) -> str:
    """Today's choice of coarse pass for ``q`` on ``backend``: ``fused`` or ``kernel`` (see below)."""
    return "fused" if backend == "naive" or q.device.type == "cpu" or is_exporting() else "kernel"


def coarse_attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    max_chunk_elements: int | None = None,
    coarse_pass: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 and eq. 3 together: the coarse output and the per-key scores, without the full N x M matrix.

    Two passes compute the same thing. ``fused``: :func:`blocked_attention_with_scores`, one q k^T and softmax per
    query block feed both. ``kernel``: the backend's attention kernel, then a blocked score pass that reuses the
    kernel's row log-sum-exp where it gives one (``flash``) and recomputes the softmax otherwise. By default
    (:func:`default_coarse_pass`) ``naive``, every backend on CPU (measured faster than the CPU SDPA kernel plus a
    score pass: docs/BENCHMARKS.md) and every backend while exporting (one graph) take ``fused``; the rest ``kernel``.

    Args:
        q: (B, h, N, d) queries; k, v: (B, h, M, d) coarse keys/values.
        backend: A concrete backend name.
        max_chunk_elements: Bound on the elements of one probability block (None: the device's default).
        coarse_pass: ``fused``, ``kernel`` or None for the default choice.

    Returns:
        out (B, h, N, d) and scores (B, h, M) float32.
    """
    if not is_exporting():
        check_choice(backend, "backend", BACKENDS[1:], "coarse_attention_with_scores")  # concrete: not "auto"
        check_score_pass_call("coarse_attention_with_scores", q, k, v, max_chunk_elements=max_chunk_elements)
    coarse_pass = _checked_coarse_pass(coarse_pass) or default_coarse_pass(q, backend)
    if coarse_pass == "fused":
        return blocked_attention_with_scores(q, k, v, max_chunk_elements)
    out, lse = attention(q, k, v, backend, return_lse=backend == "flash")
    with torch.no_grad():
        scores = coarse_key_scores(q.detach(), k.detach(), lse=lse, max_chunk_elements=max_chunk_elements)
    return out, scores


def check_pyramid_shapes(fine_hw: tuple[int, int], coarse_hw: tuple[int, int]) -> None:
    """Raise ValueError unless the coarse grid is ceil(H/2) x ceil(W/2) of the fine grid."""
    (h, w), (hu, wu) = fine_hw, coarse_hw
    if (hu, wu) != ((h + 1) // 2, (w + 1) // 2):
        swapped = " (fine and upper swapped? the fine map comes first)" if hu * wu > h * w else ""
        raise ValueError(
            f"Pyramid Sparse Attention needs the upper map at half the fine map's size (ceil(H/2) x ceil(W/2)): "
            f"fine {h}x{w} expects upper {(h + 1) // 2}x{(w + 1) // 2}, got {hu}x{wu}{swapped}."
        )


def select_fine_tokens(
    scores: torch.Tensor, fine_hw: tuple[int, int], coarse_hw: tuple[int, int], topk: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the top-k coarse tokens per (batch, head) and map each to its 2x2 fine children.

    Args:
        scores: (B, h, M) eq. 3 scores.
        fine_hw: (H, W) of the fine map; coarse_hw: (Hu, Wu) of the upper map.
        topk: Coarse tokens to keep (capped at M).
        threshold: Coarse tokens with score <= threshold are dropped.

    Returns:
        index (B, h, 4k) int64 into the N fine tokens (0 where masked) and valid (B, h, 4k) bool.
    """
    where = "select_fine_tokens"
    check_int(topk, "topk", where, minimum=0)
    check_number(threshold, "threshold", where, minimum=0, maximum=1)
    if not is_exporting():
        hu, wu = check_grid(coarse_hw, "coarse_hw", where)
        check_grid(fine_hw, "fine_hw", where)
        check_shape(check_tensor(scores, "scores", where, ndim=3), "scores", (None, None, hu * wu), "(B, h, M)", where)
    h, w = fine_hw
    wu = coarse_hw[1]
    k = min(topk, scores.shape[-1])
    if is_exporting():  # k = topk for every map size of a dynamic graph; the padding slots map outside, never valid
        # Concatenated, not F.pad: the exporter builds F.pad's pads through a reversed Slice it leaves unfolded, and
        # onnxslim, when it cannot fold through ONNX Runtime, folds that Slice wrongly (the padding went first).
        padding = torch.full_like(scores[..., :1], -1.0, dtype=scores.dtype).expand(-1, -1, topk)  # x2paddle: dtype
        scores, k = torch.cat([scores, padding], dim=-1), topk
    top_scores, top_idx = scores.topk(k, dim=-1, largest=True, sorted=True)  # (B, h, k), deterministic
    # floor_divide, not div(rounding_mode="floor"): x2paddle turns the latter into a true division (a float index,
    # refused by Paddle), and aten::floor into Python's math.floor; both export to an integer ONNX Div.
    row = torch.floor_divide(top_idx, wu)
    col = top_idx - row * wu  # not idx % wu: exports with dynamic shapes on every ONNX path
    offsets = torch.tensor([0, 0, 1, 1], device=scores.device), torch.tensor([0, 1, 0, 1], device=scores.device)
    fine_row = 2 * row.unsqueeze(-1) + offsets[0]  # (B, h, k, 4)
    fine_col = 2 * col.unsqueeze(-1) + offsets[1]
    inside = (fine_row < h) & (fine_col < w)
    valid = inside & (top_scores > threshold).unsqueeze(-1)
    # Masked children point at token 0. Arithmetic rather than where/zeros_like, and an explicit integer type: some
    # converters (CoreML) type the result of // as float, which a gather index must not be; Paddle refuses int * bool.
    index = ((fine_row * w + fine_col) * inside.to(fine_row.dtype)).to(torch.int64)
    return index.flatten(-2), valid.flatten(-2)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Export-time gather: x (B, N, C), index (B, T) -> (B, T, C) with ``out[b, t] = x[b, index[b, t]]``.

    Indexes the flattened (B * N, C) rows (a plain Gather) instead of ``torch.gather``, whose x2paddle converter
    builds its flat index by true division (a float index, which Paddle refuses); x2paddle has no index_select.
    """
    B, N, C = x.shape
    first_rows = torch.arange(B, device=index.device).unsqueeze(-1) * N  # (B, 1)
    return x.reshape(B * N, C)[(index + first_rows).flatten()].view(B, -1, C)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather tokens along dim 2: x (B, h, N, d), index (B, h, T) -> (B, h, T, d)."""
    if is_exporting_graph():
        B, h, N, d = x.shape
        return gather_rows(x.reshape(B * h, N, d), index.flatten(0, 1)).view(B, h, -1, d)
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


class FineProjection(NamedTuple):
    """Eq. 4's 1x1 K/V projection and the fine map it projects, applied by the op to the selected tokens only.

    The fine K/V of head h, token n are ``(weight[:, h] @ features[:, :, n]) * scale[:, h] + shift[:, h]`` (keys at
    index 0, values at 1): a 1x1 conv (bias in ``shift``) followed by a BatchNorm in eval mode folded to an affine.

    Attributes:
        features: (B, C, N) fine-map features, the projection's input (N = H * W tokens, row-major).
        weight: (2, h, d, C) projection weights: [0] keys, [1] values, output channels grouped per head.
        scale: (2, h, d) factor per output channel, or None for 1.
        shift: (2, h, d) offset per output channel, added last, or None for 0.
    """

    features: torch.Tensor
    weight: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None


def selected_keys_values(projection: FineProjection, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine K/V of the selected tokens only: each head's slice of the projection applied to that head's tokens.

    Equals projecting the whole fine map and gathering the selected rows (``gather_tokens(k_fine, index)``) up to
    fp32 rounding, at T / N of the projection's cost (T = 4k tokens per head instead of all N).

    Args:
        projection: The fine map and the K/V projection (see :class:`FineProjection`).
        index: (B, h, T) token indices into N, from :func:`select_fine_tokens`.

    Returns:
        k_sel, v_sel: (B, h, T, d) each (views of one (B, h, T, 2d) tensor, last dim contiguous).
    """
    x, weight = projection.features, projection.weight
    B, C, _ = x.shape
    _, h, T = index.shape
    d = weight.shape[2]
    if is_exporting_graph():
        tokens = gather_rows(x.transpose(1, 2), index.reshape(B, h * T)).view(B, h, T, C)
    else:
        tokens = x.gather(2, index.reshape(B, 1, h * T).expand(-1, C, -1))  # (B, C, h*T): each head's tokens in turn
        tokens = tokens.view(B, C, h, T).permute(0, 2, 3, 1)  # (B, h, T, C)
    kv = tokens @ weight.permute(1, 3, 0, 2).reshape(h, C, 2 * d)  # (B, h, T, 2d): keys then values
    if projection.scale is not None:
        kv = kv * projection.scale.permute(1, 0, 2).reshape(h, 1, 2 * d)
    if projection.shift is not None:
        kv = kv + projection.shift.permute(1, 0, 2).reshape(h, 1, 2 * d)
    return kv[..., :d], kv[..., d:]


def sparse_fine_attention(
    q: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, valid: torch.Tensor, backend: str = "naive"
) -> torch.Tensor:
    """Eq. 5: attention of every query over the selected fine tokens; masked tokens get no weight.

    Args:
        q: (B, h, N, d) queries.
        k_sel, v_sel: (B, h, T, d) keys/values of the selected fine tokens (:func:`gather_tokens` of the full-map
            K/V, or :func:`selected_keys_values`).
        valid: (B, h, T) from :func:`select_fine_tokens`.
        backend: ``naive`` runs an explicit softmax; any other name one SDPA call with an additive mask, which never
            holds the (B, h, N, T) logits.

    Returns:
        (B, h, N, d); zero for a (batch, head) where no token is valid.
    """
    valid = valid.to(q.dtype)  # arithmetic on 0/1 rather than boolean ops (any, masked_fill): every converter has it
    bias = ((1 - valid) * MASKED_LOGIT).unsqueeze(2)  # (B, h, 1, T): the same mask for every query
    if backend == "naive" or is_exporting_graph():
        out = naive_attention(q, k_sel, v_sel, bias)
    else:
        out = F.scaled_dot_product_attention(last_dim_contiguous(q), k_sel, v_sel, attn_mask=bias)
    any_valid = valid.amax(dim=-1)[..., None, None]  # (B, h, 1, 1)
    return out.mul_(any_valid) if _may_overwrite(out) else out * any_valid


def _may_overwrite(t: torch.Tensor) -> bool:
    """True when an in-place update of ``t`` cannot break autograd (no gradient is being recorded for it)."""
    return not (torch.is_grad_enabled() and t.requires_grad)


def pyramid_sparse_attention_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fine: torch.Tensor | None,
    v_fine: torch.Tensor | None,
    fine_hw: tuple[int, int],
    coarse_hw: tuple[int, int],
    topk: int = 8,
    threshold: float = 1e-6,
    backend: str | None = "auto",
    coarse_pass: str | None = None,
    fine_projection: FineProjection | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """O_coarse and O_fine separately (eq. 2 and eq. 5); O_fine is None when topk is 0.

    Arguments as in :func:`pyramid_sparse_attention`; k_fine/v_fine may be None when topk is 0 or when
    ``fine_projection`` is given: then only the selected tokens' fine K/V are computed (:func:`selected_keys_values`,
    cast to q's dtype) instead of reading them from full-map k_fine/v_fine.
    """
    grids = None if is_exporting() else (fine_hw, coarse_hw)  # tensors and grids are checked in eager mode only
    check_pyramid_attention_call(
        "pyramid_sparse_attention", q, k, v, k_fine, v_fine, grids, topk, threshold, fine_projection
    )
    check_type(backend, "backend", (str, type(None)), "a backend name or None", "pyramid_sparse_attention")
    if not is_exporting():
        check_pyramid_shapes(fine_hw, coarse_hw)
        if q.shape[2] != fine_hw[0] * fine_hw[1] or k.shape[2] != coarse_hw[0] * coarse_hw[1]:
            raise ValueError(f"Token counts {q.shape[2]}/{k.shape[2]} do not match grids {fine_hw}/{coarse_hw}.")
    _checked_coarse_pass(coarse_pass)
    backend = resolve_backend(backend, q, kv_len=k.shape[2])
    if topk == 0:
        return attention(q, k, v, backend)[0], None
    out_coarse, scores = coarse_attention_with_scores(q, k, v, backend, coarse_pass=coarse_pass)
    index, valid = select_fine_tokens(scores, fine_hw, coarse_hw, topk, threshold)
    if fine_projection is None:
        k_sel, v_sel = gather_tokens(k_fine, index), gather_tokens(v_fine, index)  # (B, h, T, d)
    else:
        k_sel, v_sel = (t.to(q.dtype) for t in selected_keys_values(fine_projection, index))
    return out_coarse, sparse_fine_attention(q, k_sel, v_sel, valid, backend)


def pyramid_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_fine: torch.Tensor,
    v_fine: torch.Tensor,
    fine_hw: tuple[int, int],
    coarse_hw: tuple[int, int],
    topk: int = 8,
    threshold: float = 1e-6,
    backend: str | None = "auto",
    coarse_pass: str | None = None,
) -> torch.Tensor:
    """Pyramid Sparse Attention: O = O_coarse + O_fine (paper eq. 2-5).

    Args:
        q: (B, h, N, d) queries from the fine map, N = H * W.
        k, v: (B, h, M, d) keys/values from the upper map, M = Hu * Wu.
        k_fine, v_fine: (B, h, N, d) keys/values from the fine map.
        fine_hw: (H, W); coarse_hw: (Hu, Wu) with Hu = ceil(H/2), Wu = ceil(W/2).
        topk: Coarse tokens refined per (batch, head); 0 gives coarse attention only, more than M uses all M.
        threshold: Only coarse tokens whose eq. 3 score exceeds it are refined.
        backend: ``auto``, ``naive``, ``sdpa``, ``flash``, ``sage`` or None for the process default.
        coarse_pass: How eq. 2-3 run when topk > 0: ``fused`` (one blocked pass), ``kernel`` (the backend's kernel,
            then a score pass from its log-sum-exp) or None for the default per device (see
            :func:`coarse_attention_with_scores`).

    Returns:
        (B, h, N, d) attention output.

    Examples:
        >>> q = k_fine = v_fine = torch.ones(2, 4, 13 * 13, 32)
        >>> k = v = torch.ones(2, 4, 7 * 7, 32)
        >>> pyramid_sparse_attention(q, k, v, k_fine, v_fine, (13, 13), (7, 7)).shape
        torch.Size([2, 4, 169, 32])
    """
    out_coarse, out_fine = pyramid_sparse_attention_parts(
        q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk, threshold, backend, coarse_pass
    )
    if out_fine is None:
        return out_coarse
    if _may_overwrite(out_coarse) and out_coarse.dtype == out_fine.dtype:
        return out_coarse.add_(out_fine)
    return out_coarse + out_fine
