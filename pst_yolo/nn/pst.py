"""Pyramid Sparse Transformer block (paper Fig. 2 left) and a model-wide top-k switch."""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules import Conv

from ..ops.export_compat import is_exporting
from ..validation import check_int, check_number, check_shape, check_tensor, check_type
from .psa import HEAD_DIM, PSAttn


class PSAttnBlock(nn.Module):
    """Residual Pyramid Sparse Attention followed by a residual 1x1-conv MLP.

    Examples:
        >>> block = PSAttnBlock(64, num_heads=2).eval()
        >>> block(torch.ones(2, 64, 10, 6), torch.ones(2, 64, 5, 3)).shape
        torch.Size([2, 64, 10, 6])
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, **attn_kwargs):
        super().__init__()
        hidden = int(dim * check_number(mlp_ratio, "mlp_ratio", "PSAttnBlock", minimum=0, above_minimum=True))
        if hidden < 1:
            raise ValueError(
                f"PSAttnBlock: the MLP width int(dim * mlp_ratio) = int({dim} * {mlp_ratio}) must be >= 1."
            )
        self.attn = PSAttn(dim, num_heads, **attn_kwargs)
        self.mlp = nn.Sequential(Conv(dim, hidden, 1), Conv(hidden, dim, 1, act=False))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), up (B, C, ceil(H/2), ceil(W/2)) -> (B, C, H, W)."""
        x = x + self.attn(x, up)
        return x + self.mlp(x)


class PST(nn.Module):
    """Pyramid Sparse Transformer: fuse a fine map with its upper map through n stacked PSA blocks.

    ``forward([fine, upper])``: fine (B, c1, H, W) and upper (B, c_up, ceil(H/2), ceil(W/2)) are projected to
    C' = c2 * e channels; block i queries with block i-1's output and takes K/V from the projected upper map; the
    projected fine map and all block outputs are concatenated and projected to c2 channels.

    Parameters (trainable, exact), with C' = int(c2 * e) and hidden = int(C' * mlp_ratio):
        (c1 + c_up + 4) C' + n (4 C'^2 + 2 hidden C' + 61 C' + 2 hidden) + (n + 1) C' c2 + 2 c2
    (``gate=True`` adds n (2 * 32 * 32 + 32); ``shared_fine_kv=False`` adds n (2 C'^2 + 4 C').)

    Args:
        c1: Fine-map channels.
        c_up: Upper-map channels.
        c2: Output channels.
        n: Stacked PSA blocks.
        mlp_ratio: MLP hidden width over C'.
        e: C' / c2; C' must be a positive multiple of 32 (heads = C' / 32).
        k: Top-k upper tokens refined at inference (0 = coarse only).
        **attn_kwargs: Passed to :class:`PSAttn` (threshold, gate, shared_fine_kv, fine_in_training, backend).

    Examples:
        >>> pst = PST(128, 256, 128).eval()
        >>> pst([torch.ones(1, 128, 40, 40), torch.ones(1, 256, 20, 20)]).shape
        torch.Size([1, 128, 40, 40])
    """

    def __init__(
        self, c1: int, c_up: int, c2: int, n: int = 1, mlp_ratio: float = 2.0, e: float = 0.5, k: int = 8, **attn_kwargs
    ):
        super().__init__()
        where = "PST"
        c1, c_up = check_int(c1, "c1", where, minimum=1), check_int(c_up, "c_up", where, minimum=1)
        c2, k = check_int(c2, "c2", where), check_int(k, "k", where, minimum=0)
        n = check_int(n, "n (stacked PSA blocks)", where, minimum=1)
        check_number(mlp_ratio, "mlp_ratio", where, minimum=0, above_minimum=True)
        c_ = int(c2 * check_number(e, "e", where, minimum=0, above_minimum=True))
        if c_ <= 0 or c_ % HEAD_DIM:
            raise ValueError(
                f"PST(c1={c1}, c_up={c_up}, c2={c2}, e={e}): the token dim C' = int(c2 * e) = {c_} must be a positive "
                f"multiple of {HEAD_DIM} (heads of {HEAD_DIM} channels); change c2 or e."
            )
        self.cv1 = Conv(c1, c_, 1)
        self.cvup = Conv(c_up, c_, 1)
        self.blocks = nn.ModuleList(PSAttnBlock(c_, c_ // HEAD_DIM, mlp_ratio, topk=k, **attn_kwargs) for _ in range(n))
        self.cv2 = Conv((n + 1) * c_, c2, 1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """xs = [fine (B, c1, H, W), upper (B, c_up, ceil(H/2), ceil(W/2))] -> (B, c2, H, W)."""
        if not isinstance(xs, (list, tuple)) or len(xs) != 2:
            raise TypeError("PST.forward expects a list [fine_map, upper_map].")
        fine, upper = xs
        if not is_exporting():  # metadata only: no sync
            self.check_inputs(fine, upper)
        outs = [self.cv1(fine)]
        up = self.cvup(upper)  # (B, C', Hu, Wu)
        for block in self.blocks:
            outs.append(block(outs[-1], up))
        return self.cv2(torch.cat(outs, dim=1))

    def check_inputs(self, fine: torch.Tensor, upper: torch.Tensor) -> None:
        """Raise naming this layer (its YAML index when built from a YAML) unless fine (B, c1, H, W) and upper
        (B, c_up, ceil(H/2), ceil(W/2)) fit it."""
        where = "PST" if getattr(self, "i", None) is None else f"PST (layer {self.i})"
        check_tensor(fine, "fine map", where, ndim=4)
        check_tensor(upper, "upper map", where, ndim=4)
        (H, W), (Hu, Wu) = fine.shape[2:], upper.shape[2:]
        if Hu * Wu > H * W:
            raise ValueError(
                f"{where}: the upper map ({Hu}x{Wu}) is larger than the fine map ({H}x{W}): the inputs look swapped; "
                "pass [fine_map, upper_map] (in a YAML row: 'from' = [fine, upper])."
            )
        c1, c_up = self.cv1.conv.in_channels, self.cvup.conv.in_channels
        check_shape(fine, "fine map", (None, c1, None, None), "(B, c1, H, W)", where)
        expected = (len(fine), c_up, (H + 1) // 2, (W + 1) // 2)
        check_shape(upper, "upper map", expected, "(B, c_up, ceil(H/2), ceil(W/2)): half the fine map", where)


def set_topk(model: nn.Module, k: int) -> int:
    """Set the inference top-k of every PSA module in ``model`` (0 = coarse attention only).

    Returns:
        How many PSA modules were changed.
    """
    check_type(model, "model", nn.Module, "a torch.nn.Module (for a YOLO object: yolo.model)", "set_topk")
    k = check_int(k, "topk", "set_topk", minimum=0)
    modules = [m for m in model.modules() if isinstance(m, PSAttn)]
    for m in modules:
        m.topk = k
    return len(modules)
