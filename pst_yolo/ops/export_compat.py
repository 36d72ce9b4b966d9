"""The op's graph form while a model is exported or compiled, and the converter workarounds it needs, in one place.

Ultralytics' exporter hands one traced graph (TorchScript / ONNX) to every converter. In it attention is plain
MatMul + Softmax (no SDPA op to mistranslate), cut into a fixed number of query blocks, and every op below is one that
each converter reads right.

Form (where in the op), the converters that need it, and why:

- attention as MatMul + Softmax: every format. No SDPA node, which several converters lack or mistranslate.
- query blocks (:func:`traced_query_blocks`): ONNX Runtime, OpenVINO. Each block's chain runs in cache (5% at 640).
- key sums as ``ones @ probs`` (:func:`sum_over_queries`): ONNX Runtime, whose ReduceSum over a middle axis is ~10x
  slower; the ones made from the block's output, or its depth-first node order runs all logits before any ``p v``.
- top-k scores padded by concatenation, not ``F.pad`` (:func:`pad_scores_for_topk`): onnxslim folds F.pad's
  reversed Slice wrongly when ONNX Runtime cannot fold it.
- ``full_like(..., dtype=)``, not ``ones_like`` / ``new_ones``: x2paddle, CoreML lack those.
- flat-row gather (:func:`gather_rows`), not ``torch.gather``: x2paddle's gather builds a float index.
- ``floor_divide`` and ``a - b * (a // b)``, not ``div(rounding_mode=)`` or ``%``, explicit integer casts (eq. 4's
  children): x2paddle (true division), CoreML (float index), dynamic-shape ONNX (modulo).
- channels-last queries, indexing instead of ``unbind`` (PSAttn): LiteRT drops the transpose of a channels-first
  1-head q k^T; x2paddle has no unbind.
- the eq. 5 mask as arithmetic on 0/1 with a finite constant: boolean ops are not in every converter, and -inf-like
  constants overflow in TensorRT fp16 engines.
"""

from __future__ import annotations

import warnings

import torch

TRACED_BLOCK_ELEMENTS = 1 << 20  # elements of one (B, h, rows, M) logits block in a traced graph (4 MB in fp32)
TRACED_MAX_BLOCKS = 16  # query blocks per attention call in a traced graph at most


def is_exporting() -> bool:
    """True while tracing/scripting/compiling, where only plain PyTorch ops may run."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def is_exporting_graph() -> bool:
    """True while a graph for another runtime is built: ONNX export, TorchScript tracing/scripting, ``torch.export``.

    Unlike :func:`is_exporting`, false under ``torch.compile``, which keeps the fused kernels. Every converter of
    Ultralytics' exporter (ONNX, OpenVINO, CoreML, PaddlePaddle, ncnn, LiteRT) reads such a graph.
    """
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


def traced_query_blocks(q: torch.Tensor, num_keys: int) -> list[torch.Tensor]:
    """q (B, h, N, d) cut along N into query blocks for a traced graph (TorchScript, ONNX); ``[q]`` elsewhere.

    An exported graph runs attention as MatMul, Softmax and MatMul over the whole (B, h, N, M) logits, each node
    streaming them through memory (41 MB at 640 px P3, 655 MB at 1280). Cut into blocks of at most
    ``TRACED_BLOCK_ELEMENTS`` logits (at most ``TRACED_MAX_BLOCKS`` blocks), each block's chain runs in cache: ONNX
    Runtime runs YOLO11n-PST at 640 5.4% (k=0) and 3.3% (k=8) faster with one thread. The block count is fixed at the
    traced size; the block length is computed in the graph from N (Shape, Div, Slice), so a dynamic graph is right at
    every size, where blocks past N are empty slices.

    Args:
        q: (B, h, N, d) queries.
        num_keys: M, the keys each query attends to.

    Returns:
        Views of q along dim 2 that concatenate back to q.
    """
    if not torch.jit.is_tracing():
        return [q]
    B, h, n, _ = q.shape
    with warnings.catch_warnings():  # a constant of the graph on purpose: the number of blocks
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        elements = int(B * h * n * num_keys)
    blocks = min(TRACED_MAX_BLOCKS, -(-elements // TRACED_BLOCK_ELEMENTS))
    if blocks <= 1:
        return [q]
    rows = (n + blocks - 1) // blocks  # traced: recomputed from N in the graph
    return [q[:, :, i * rows : (i + 1) * rows] for i in range(blocks)]


def sum_over_queries(probs: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, rows, M) -> (B, h, M) as a product with a (B, h, 1, rows) ones vector (graph form of the key sums).

    ``after`` (B, h, rows, d), a tensor the sum must wait for (the block's attention output): the ones are then made
    from it (its first column clamped to 1; a NaN row stays NaN, as the product makes it anyway), which orders the
    block's ``p v`` before its key sums in ONNX Runtime.
    """
    if after is None:  # full_like with an explicit dtype: x2paddle has no ones_like, CoreML no new_ones
        ones = torch.full_like(probs[..., 0], 1.0, dtype=probs.dtype).unsqueeze(-2)
    else:
        ones = after[..., 0].to(probs.dtype).unsqueeze(-2).clamp(1.0, 1.0)
    return (ones @ probs).squeeze(-2)


def pad_scores_for_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, h, M) scores followed by ``topk`` slots of -1, so that a dynamic graph takes k = topk at every map size.

    The padding slots are never valid (below any threshold) and map outside the grid. Concatenated, not ``F.pad``:
    the exporter builds F.pad's pads through a reversed Slice it leaves unfolded, and onnxslim, when it cannot fold
    through ONNX Runtime, folds that Slice wrongly (the padding went first).
    """
    padding = torch.full_like(scores[..., :1], -1.0, dtype=scores.dtype).expand(-1, -1, topk)  # x2paddle: dtype
    return torch.cat([scores, padding], dim=-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Graph-form gather: x (B, N, C), index (B, T) -> (B, T, C) with ``out[b, t] = x[b, index[b, t]]``.

    Indexes the flattened (B * N, C) rows (a plain Gather) instead of ``torch.gather``, whose x2paddle converter
    builds its flat index by true division (a float index, which Paddle refuses); x2paddle has no index_select.
    """
    B, N, C = x.shape
    first_rows = torch.arange(B, device=index.device).unsqueeze(-1) * N  # (B, 1)
    return x.reshape(B * N, C)[(index + first_rows).flatten()].view(B, -1, C)
