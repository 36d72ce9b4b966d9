"""Test helpers for half precision: the eq. 2-5 path in plain PyTorch at a given dtype, selections and errors.

flash-attention's tolerance rule (tests/test_flash_attn.py, "numerical error is at most twice the numerical error
of a Pytorch implementation"): a fast path run in fp16/bf16 is compared with a float64 reference computed from the
same (rounded) inputs, and its largest error must be at most twice that of the plain PyTorch computation done in
the same low precision (``plain_psa`` below, the analogue of their ``attention_ref(..., upcast=False)``).
"""

from __future__ import annotations

import math

import torch
from export_helpers import IMAGES, calibrate_random_weights, letterboxed

from pst_yolo.ops.reference import pyramid_sparse_attention_reference as reference_psa


def child_index(top_idx: torch.Tensor, fine_hw, coarse_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse indices (B, h, k) -> fine child indices (B, h, 4k) and whether each child lies inside the fine map."""
    (h, w), wu = fine_hw, coarse_hw[1]
    rows, cols = top_idx // wu, top_idx % wu
    children, inside = [], []
    for a in (0, 1):
        for b in (0, 1):
            r, c = 2 * rows + a, 2 * cols + b
            inside.append((r < h) & (c < w))
            children.append((r * w + c).clamp(max=h * w - 1))
    return torch.cat(children, -1), torch.cat(inside, -1)


def plain_psa(q, k, v, k_fine, v_fine, fine_hw, coarse_hw, topk, threshold=1e-6):
    """Eq. 2-5 with plain PyTorch ops in the inputs' dtype (dense N x M softmax, no chunking, no fused kernels)."""
    d = q.shape[-1]
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, h, N, M), in q's dtype
    out = probs @ v
    if topk == 0:
        return out
    scores = probs.mean(dim=2)  # (B, h, M)
    top_scores, top_idx = scores.topk(min(topk, scores.shape[-1]), dim=-1)
    index, inside = child_index(top_idx, fine_hw, coarse_hw)
    valid = inside & (top_scores > threshold).repeat(1, 1, 4)
    k_sel = k_fine.gather(2, index[..., None].expand(-1, -1, -1, d))
    v_sel = v_fine.gather(2, index[..., None].expand(-1, -1, -1, d))
    logits = (q @ k_sel.transpose(-2, -1) / math.sqrt(d)).masked_fill(~valid[:, :, None], float("-inf"))
    fine = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ v_sel
    return out + fine


def selected_sets(q, k, topk: int) -> list[list[set[int]]]:
    """Per (batch, head): the set of the top-k coarse tokens by eq. 3 scores, computed in q's dtype."""
    scores = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1).float().mean(dim=2)
    idx = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    return [[set(idx[b, h].tolist()) for h in range(idx.shape[1])] for b in range(idx.shape[0])]


def selection_change(low, high) -> tuple[float, float]:
    """(fraction of (batch, head) whose top-k set differs, fraction of selected tokens that differ)."""
    pairs = [(a, b) for rows_a, rows_b in zip(low, high) for a, b in zip(rows_a, rows_b)]
    sets_changed = sum(a != b for a, b in pairs) / len(pairs)
    tokens_changed = sum(len(a - b) for a, b in pairs) / max(1, sum(len(b) for _, b in pairs))
    return sets_changed, tokens_changed


def precision_errors(op_out, inputs, fine_hw, coarse_hw, topk, threshold=1e-6) -> tuple[float, float]:
    """(max error of ``op_out``, max error of ``plain_psa``), both against float64 on the same rounded inputs."""
    expected = reference_psa(*inputs, fine_hw, coarse_hw, topk, threshold)
    plain = plain_psa(*inputs, fine_hw, coarse_hw, topk, threshold)
    return (op_out.double() - expected).abs().max().item(), (plain.double() - expected).abs().max().item()


def calibrated_yolo11n_pst(imgsz: int):
    """YOLOv11-PST-N with BatchNorm calibrated on Ultralytics' two bundled images, and those images (2, 3, S, S)."""
    from ultralytics.nn.tasks import DetectionModel

    x = torch.cat([letterboxed(name, (imgsz, imgsz)) for name in IMAGES])
    model = DetectionModel("yolo11n-pst.yaml", verbose=False)
    calibrate_random_weights(model, x)
    return model, x


def output_difference(a: torch.Tensor, b: torch.Tensor, imgsz: int) -> float:
    """Largest |a - b| of two raw detection outputs (B, 4 + nc, A), boxes in units of the input size."""
    scale = torch.ones(a.shape[1], 1)
    scale[:4] = imgsz
    return ((a - b) / scale).abs().max().item()
