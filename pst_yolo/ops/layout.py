"""Memory-layout helpers (pure tensor ops)."""

from __future__ import annotations

import torch


class _ChannelsFirstCopy(torch.autograd.Function):
    """Channels-first copy whose backward hands the gradient back channels-last."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Channels-first copy (B, C, H, W) of a channels-last map x (B, C, H, W), equal in value.

    Its gradient goes back channels-last, the layout x was computed in: ``.contiguous()`` would pass the channels-first
    gradient on, and PyTorch's CPU kernels of a channels-last map (a bilinear resize, a depthwise conv) run their
    backward several times slower on a channels-first gradient.
    """
    return _ChannelsFirstCopy.apply(x)
