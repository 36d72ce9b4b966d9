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
from .backends import BACKENDS, attention, last_dim_contiguous, naive_attention, resolve_backend
from .blocked_pass import blocked_attention_with_scores
from .export_compat import gather_rows, is_exporting, is_exporting_graph, pad_scores_for_topk
from .score_pass import coarse_key_scores as _coarse_key_scores

COARSE_PASSES = ("fused", "kernel")  # see coarse_attention_with_scores
# Logit offset of a masked fine token (eq. 5): exp(-1e4) is 0 in every float type, and the constant is finite in
# float16. dtype-derived extremes are not: the fp32 graph's finfo.min / 2 (-1.7e38) becomes -inf in a TensorRT fp16
# engine, and (1 - valid) * -inf is NaN for every valid token.
MASKED_LOGIT = -1.0e4


def _checked_coarse_pass(coarse_pass: str | None) -> str | None:
    if coarse_pass is not None and coarse_pass not in COARSE_PASSES:
        raise ValueError(f"coarse_pass must be one of {', '.join(COARSE_PASSES)} or None, got {coarse_pass!r}.")
    return coarse_pass


def default_coarse_pass(q: torch.Tensor, backend: str) -> str:
    """Today's choice of coarse pass for ``q`` on ``backend``: ``fused`` or ``kernel`` (see below)."""
    return "fused" if backend == "naive" or q.device.type == "cpu" or is_exporting() else "kernel"


def coarse_key_scores(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, max_chunk_elements: int | None = None
) -> torch.Tensor:
    """Eq. 3 scores (B, h, M) float32 of queries q (B, h, N, d) over keys k (B, h, M, d), arguments checked; see
    :func:`pst_yolo.ops.score_pass.coarse_key_scores`."""
    if not is_exporting():
        check_score_pass_call("coarse_key_scores", q, k, lse=lse, max_chunk_elements=max_chunk_elements)
    return _coarse_key_scores(q, k, lse, max_chunk_elements)


def coarse_attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    max_chunk_elements: int | None = None,
    coarse_pass: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 and eq. 3 together, arguments checked: the coarse output and the per-key scores (see
    :func:`_coarse_attention_with_scores`)."""
    if not is_exporting():
        check_choice(backend, "backend", BACKENDS[1:], "coarse_attention_with_scores")  # concrete: not "auto"
        check_score_pass_call("coarse_attention_with_scores", q, k, v, max_chunk_elements=max_chunk_elements)
    return _coarse_attention_with_scores(q, k, v, backend, max_chunk_elements, _checked_coarse_pass(coarse_pass))


def _coarse_attention_with_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    max_chunk_elements: int | None = None,
    coarse_pass: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one dispatch of eq. 2 + eq. 3 among the fast paths, without the full N x M matrix.

    Two passes compute the same thing. ``fused`` (:mod:`~pst_yolo.ops.blocked_pass`): one q k^T and softmax per query
    block feed both. ``kernel``: the backend's attention kernel, then the eq. 3 score pass
    (:mod:`~pst_yolo.ops.score_pass`), which reuses the kernel's row log-sum-exp where it gives one (``flash``) and
    recomputes the softmax otherwise. By default (:func:`default_coarse_pass`) ``naive``, every backend on CPU (faster
    there than the CPU SDPA kernel plus a score pass) and every backend while exporting (one graph) take ``fused``;
    the rest ``kernel``.

    Args:
        q: (B, h, N, d) queries; k, v: (B, h, M, d) coarse keys/values.
        backend: A concrete backend name.
        max_chunk_elements: Bound on the elements of one probability block (None: the device's default).
        coarse_pass: ``fused``, ``kernel`` or None for the default choice.

    Returns:
        out (B, h, N, d) and scores (B, h, M) float32.
    """
    if (coarse_pass or default_coarse_pass(q, backend)) == "fused":
        return blocked_attention_with_scores(q, k, v, max_chunk_elements)
    out, lse = attention(q, k, v, backend, return_lse=backend == "flash")  # eq. 2
    with torch.no_grad():
        scores = _coarse_key_scores(q.detach(), k.detach(), lse, max_chunk_elements)  # eq. 3
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
    """Pick the top-k coarse tokens per (batch, head) and map each to its 2x2 fine children (arguments checked).

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
    return _select_fine_tokens(scores, fine_hw, coarse_hw, topk, threshold)


def _select_fine_tokens(
    scores: torch.Tensor, fine_hw: tuple[int, int], coarse_hw: tuple[int, int], topk: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4's index set: top-k coarse tokens by score (above ``threshold``) and their 2x2 fine children."""
    h, w = fine_hw
    wu = coarse_hw[1]
    k = min(topk, scores.shape[-1])
    if is_exporting():  # k = topk for every map size of a dynamic graph
        scores, k = pad_scores_for_topk(scores, topk), topk
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
    fp32 rounding, at T / N of the projection's cost (T = 4k tokens per head instead of all N): 6% of YOLO11n-PST's
    latency at k=8 (640 px, 1 thread, CPU time; median of 3 runs, 4.5-6.2%).

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
    out_coarse, scores = _coarse_attention_with_scores(q, k, v, backend, coarse_pass=coarse_pass)  # eq. 2, 3
    index, valid = _select_fine_tokens(scores, fine_hw, coarse_hw, topk, threshold)  # eq. 4: the index set
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
