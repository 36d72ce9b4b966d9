"""Batch statistics of a projection's output computed from its input (pure tensor math)."""

from __future__ import annotations

import torch


def pointwise_conv_moments(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and unbiased variance of a bias-free 1x1 conv's output, without computing the output.

    Per pixel y = W x, so mean(y) = W mean(x) and var(y) = diag(W cov(x) W^T): one (C, C) covariance of the centred
    input instead of the (B, C_out, H, W) output and a reduction over it. The statistics BatchNorm tracks in training
    (``running_var`` is unbiased), in float32 whatever the input's dtype, with autocast off: under AMP the covariance
    product would run in float16, whose sum over B * H * W pixels overflows (16 x 80 x 80 unit-variance pixels
    already exceed its 65504).

    Args:
        x: (B, C, H, W) input, at least two values per channel.
        weight: (C_out, C, 1, 1) conv weight.

    Returns:
        mean, var: (C_out,) float32 each.
    """
    with torch.autocast(x.device.type, enabled=False):
        tokens = x.detach().float().flatten(2)  # (B, C, HW)
        count = tokens.shape[0] * tokens.shape[2]
        mean = tokens.sum(2).sum(0) / count  # (C,)
        centred = tokens - mean[:, None]
        covariance = torch.bmm(centred, centred.transpose(1, 2)).sum(0) / (count - 1)  # (C, C)
        w = weight.detach().float().flatten(1)  # (C_out, C)
        return w @ mean, ((w @ covariance) * w).sum(1)
