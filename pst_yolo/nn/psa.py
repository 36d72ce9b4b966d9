"""Pyramid Sparse Attention module (paper Fig. 2 right, eq. 1-6)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules import Conv
from ultralytics.utils import LOGGER

from ..ops import BACKENDS, FineProjection, pyramid_sparse_attention_parts
from ..ops.export_compat import is_exporting
from ..ops.statistics import pointwise_conv_moments
from ..validation import check_bool, check_choice, check_int, check_number, check_shape, check_tensor

HEAD_DIM = 32
_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        LOGGER.warning(message)


def split_heads(kv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, H, W) K/V map (channels: K then V, each grouped per head) -> K and V, (B, nh, H * W, d) views each.

    Indexing rather than ``unbind``, which some converters (x2paddle) lack.
    """
    heads = kv.view(kv.shape[0], 2, num_heads, head_dim, -1).transpose(-1, -2)  # (B, 2, nh, N, d)
    return heads[:, 0], heads[:, 1]


class PSAttn(nn.Module):
    """Cross-attention from a fine map to its upper (half-size) map, refined on the top-k upper tokens.

    Q comes from the fine map, one shared K/V projection is applied to the upper map (coarse K/V) and to the fine
    map (fine K/V, eq. 4). In ``train()`` mode only the coarse branch runs (unless ``fine_in_training``); in
    ``eval()`` mode the fine branch runs with ``topk`` tokens (0 switches it off), so a model trained coarse-only
    is refined at inference without retraining.

    The shared K/V projection keeps two sets of BatchNorm statistics with one affine: the upper map's (used for the
    coarse K/V) and the fine map's, tracked in training at no gradient cost and used for the fine K/V, so fine
    features are never normalised with upper-map statistics. The fine statistics follow every mode of kv's
    ``nn.BatchNorm2d``: exponential average (``momentum`` a float), cumulative average (``momentum=None``, as
    ``torch.optim.swa_utils.update_bn`` sets), a restart after ``reset_running_stats()``, batch statistics
    (``track_running_stats=False``), and no update while the BN itself is in eval mode.

    The fine K/V are computed for the selected tokens only: the op selects first, then applies each head's slice of
    the projection and its BN (as an affine, :meth:`fine_projection`) to that head's 4k gathered tokens, not to all
    H * W. Only where the BN normalises with batch statistics (training mode) is the whole fine map projected.

    Attributes:
        q (Conv): 1x1 conv + BN, fine map -> queries.
        kv (Conv): 1x1 conv + BN, shared K/V projection (channels: K then V, each grouped per head).
        kv_fine (Conv | None): Unshared fine K/V projection (ablation ``shared_fine_kv=False``).
        pe (Conv): 7x7 depthwise conv + BN on the coarse V, upsampled bilinearly to the fine size (CPE), as the
            authors' code does.
        proj (Conv): 1x1 conv + BN output projection.
        gate (nn.Linear | None): Self-gating of eq. 7-8 (ablation ``gate=True``), shared by all heads.

    Examples:
        >>> attn = PSAttn(64, num_heads=2).eval()
        >>> attn(torch.ones(1, 64, 13, 13), torch.ones(1, 64, 7, 7)).shape
        torch.Size([1, 64, 13, 13])
    """

    topk_override: int | None = None  # process-wide top-k set by override_topk() (the CLI's topk=K)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int = 8,
        threshold: float = 1e-6,
        gate: bool = False,
        shared_fine_kv: bool = True,
        fine_in_training: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        where = "PSAttn"
        dim, num_heads = check_int(dim, "dim", where, minimum=1), check_int(num_heads, "num_heads", where, minimum=1)
        if dim % num_heads:
            raise ValueError(f"PSAttn: dim {dim} must be a positive multiple of num_heads {num_heads}.")
        topk, threshold = check_int(topk, "topk", where, minimum=0), check_number(threshold, "threshold", where, 0, 1)
        for name, flag in (("gate", gate), ("shared_fine_kv", shared_fine_kv), ("fine_in_training", fine_in_training)):
            check_bool(flag, name, where)
        backend = check_choice(backend, "backend", BACKENDS, where, allow_none=True)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.topk, self.threshold, self.fine_in_training, self.backend = topk, threshold, fine_in_training, backend
        self.q = Conv(dim, dim, 1, act=False)
        self.kv = Conv(dim, 2 * dim, 1, act=False)
        self.kv_fine = None if shared_fine_kv else Conv(dim, 2 * dim, 1, act=False)
        self.pe = Conv(dim, dim, 7, g=dim, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.gate = nn.Linear(2 * self.head_dim, self.head_dim) if gate else None
        # Fine-map statistics of the shared K/V conv, and their fold for after Ultralytics fuses kv's BN away.
        self.register_buffer("fine_kv_mean", torch.zeros(2 * dim))
        self.register_buffer("fine_kv_var", torch.ones(2 * dim))
        self.register_buffer("fine_kv_scale", torch.ones(2 * dim))
        self.register_buffer("fine_kv_shift", torch.zeros(2 * dim))
        self.register_buffer("fine_stats_skipped", torch.zeros((), dtype=torch.int64), persistent=False)

    @classmethod
    def override_topk(cls, k: int | None) -> None:
        """Force top-k ``k`` on every PSAttn of the process (models loaded later included); None restores each own."""
        cls.topk_override = None if k is None else check_int(k, "topk", "PSAttn.override_topk", minimum=0)

    def active_topk(self) -> int:
        """Top-k used by the next forward: ``topk`` in eval (or with ``fine_in_training``), else 0."""
        if self.training and not self.fine_in_training:
            return 0
        return self.topk if self.topk_override is None else self.topk_override

    @torch.no_grad()
    def fold_fine_norm(self) -> None:
        """Store the fine-statistics BN as an affine on the coarse-normalised K/V, before kv's BN is fused away.

        With y = BN_upper(conv x), the fine-normalised value is y * sigma_u / sigma_f + shift (per channel). Without
        autograd: the buffers stay leaves, which ``copy.deepcopy`` (the exporter, EMA) and pickling need.
        """
        bn = getattr(self.kv, "bn", None)
        if bn is None or self.kv_fine is not None:
            return
        sigma_u = (bn.running_var + bn.eps).sqrt()
        sigma_f = (self.fine_kv_var + bn.eps).sqrt()
        scale = sigma_u / sigma_f
        self.fine_kv_scale.copy_(scale)
        self.fine_kv_shift.copy_(bn.bias * (1 - scale) + bn.weight * (bn.running_mean - self.fine_kv_mean) / sigma_f)

    def fine_keys_values(self, x: torch.Tensor) -> torch.Tensor:
        """Fine K/V map (B, 2C, H, W) from the fine map x (B, C, H, W) through the shared (or unshared) projection."""
        if self.kv_fine is not None:
            return self.kv_fine(x)
        bn = getattr(self.kv, "bn", None)
        if bn is None:  # kv was fused by Ultralytics: fold_fine_norm() ran first
            return self.kv(x) * self.fine_kv_scale[:, None, None] + self.fine_kv_shift[:, None, None]
        self.track_fine_statistics(x)
        y = self.kv.conv(x)  # (B, 2C, H, W)
        if bn.training or bn.running_mean is None:  # batch statistics, where nn.BatchNorm2d uses them
            return F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return F.batch_norm(y, self.fine_kv_mean, self.fine_kv_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def fine_projection(self, x: torch.Tensor) -> FineProjection | None:
        """The fine K/V projection of x (B, C, H, W) for the op to apply to the selected tokens only.

        Weight (2, h, d, C) of the shared (or unshared) 1x1 conv and its BatchNorm as an affine (2, h, d) each: the
        fine-map statistics for the shared conv (after Ultralytics' fuse: the fused conv's bias then the folded fine
        affine), the conv's own for the unshared one. None where the BatchNorm normalises with batch statistics
        (training mode, or no running statistics): those need the whole map, so :meth:`fine_keys_values` runs.
        """
        module = self.kv if self.kv_fine is None else self.kv_fine
        bn, conv = getattr(module, "bn", None), module.conv
        if bn is None:  # fused by Ultralytics: conv with bias; for the shared conv, fold_fine_norm() ran first
            scale = self.fine_kv_scale if self.kv_fine is None else None
            shift = conv.bias if scale is None else conv.bias * scale + self.fine_kv_shift
        elif bn.training or bn.running_mean is None:
            return None
        else:
            shared = self.kv_fine is None
            mean, var = (self.fine_kv_mean, self.fine_kv_var) if shared else (bn.running_mean, bn.running_var)
            scale = bn.weight * (var + bn.eps).rsqrt()
            shift = bn.bias - mean * scale
        heads = (2, self.num_heads, self.head_dim)  # output channels: K then V, each grouped per head
        return FineProjection(
            x.flatten(2),  # (B, C, N)
            conv.weight.view(*heads, -1),  # (2, h, d, C) from (2C, C, 1, 1)
            None if scale is None else scale.view(heads),
            shift.view(heads),
        )

    def track_fine_statistics(self, x: torch.Tensor) -> None:
        """Fold the batch statistics of the shared K/V conv on the fine map x (B, C, H, W) into the fine running
        statistics; no gradient.

        The batch mean and unbiased variance come from x's moments (:func:`pointwise_conv_moments`, in float32 with
        autocast off), not from the conv's (B, 2C, H, W) output. Mirrors ``nn.BatchNorm2d`` in training: kv's BN has
        already counted this batch in ``num_batches_tracked`` (the upper map went through it first), so
        ``momentum=None`` gives the cumulative average 1/n, and n == 1 (a fresh start or the first batch after
        ``reset_running_stats()``) restarts from mean 0, variance 1. A batch whose statistics are not finite (a
        non-finite input) is not folded in: the buffers keep their values and ``fine_stats_skipped`` counts it, to
        be reported at the next ``train()``/``eval()``. Tensor ops only: no GPU sync. Nothing happens when kv's BN is
        in eval mode or keeps no running statistics.
        """
        if not self._tracks_fine_statistics():
            return
        bn = self.kv.bn
        mean, var = pointwise_conv_moments(x, self.kv.conv.weight)
        with torch.no_grad():
            finite = mean.isfinite().all() & var.isfinite().all()  # () bool, on the device
            self.fine_stats_skipped += (~finite).to(self.fine_stats_skipped.dtype)
            count = bn.num_batches_tracked
            restart = (count == 1) & finite
            self.fine_kv_mean.masked_fill_(restart, 0.0)
            self.fine_kv_var.masked_fill_(restart, 1.0)
            factor = (1.0 / count.clamp(min=1)) if bn.momentum is None else bn.momentum
            if isinstance(factor, torch.Tensor):
                factor = factor.to(self.fine_kv_mean.dtype)
            for buffer, batch_value in ((self.fine_kv_mean, mean), (self.fine_kv_var, var)):
                buffer.lerp_(torch.where(finite, batch_value.to(buffer.dtype), buffer), factor)

    def train(self, mode: bool = True) -> PSAttn:
        """``nn.Module.train``; first warns (once per process) if batches were left out of the fine statistics."""
        skipped = int(self.fine_stats_skipped)  # a sync, at a mode switch only
        if skipped:
            self.fine_stats_skipped.zero_()
            _warn_once(
                "skipped",
                f"PSAttn: {skipped} training batch(es) gave non-finite fine-map statistics (a non-finite input or "
                "activation); they were left out of fine_kv_mean/fine_kv_var, which stay finite.",
            )
        return super().train(mode)

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``torch.load`` of a checkpoint, ``copy.deepcopy``): defaults for attributes that older
        checkpoints lack, and a warning when the fine statistics they carry are not finite."""
        super().__setstate__(state)
        if "fine_stats_skipped" not in self._buffers:
            self.register_buffer("fine_stats_skipped", torch.zeros((), dtype=torch.int64), persistent=False)
        self._check_fine_statistics()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._check_fine_statistics()

    def _check_fine_statistics(self) -> None:
        """Warn (once per process) if the fine statistics are not finite, as AMP training before pst-yolo 0.2 left
        them: the fine branch (top-k > 0) would give NaN."""
        buffers = (self._buffers.get("fine_kv_mean"), self._buffers.get("fine_kv_var"))
        if any(b is not None and not b.isfinite().all() for b in buffers):
            _warn_once(
                "loaded",
                "PSAttn: this model's fine-map statistics (fine_kv_mean/fine_kv_var) are not finite, as AMP training "
                "with pst-yolo < 0.2 left them; with top-k > 0 its outputs would be NaN. Recompute them from a few "
                "batches of images: `pst-yolo recalibrate model=best.pt source=path/to/train/images` (as "
                "torch.optim.swa_utils.update_bn recomputes BatchNorm statistics), or use top-k 0.",
            )

    def _tracks_fine_statistics(self) -> bool:
        """Whether kv's BN updates running statistics now (training, tracking, not fused away)."""
        bn = getattr(self.kv, "bn", None)
        return bn is not None and bn.training and bn.track_running_stats and bn.num_batches_tracked is not None

    def forward(self, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Attend from x (B, C, H, W) to up (B, C, ceil(H/2), ceil(W/2)); returns (B, C, H, W)."""
        if not is_exporting():  # metadata only: no sync
            C, where = self.num_heads * self.head_dim, "PSAttn.forward"
            check_shape(check_tensor(x, "x", where, ndim=4), "x", (None, C, None, None), "(B, C, H, W)", where)
            check_shape(check_tensor(up, "up", where, ndim=4), "up", (len(x), C, None, None), "(B, C, Hu, Wu)", where)
        B, C, H, W = x.shape
        Hu, Wu = up.shape[2:]
        nh, d = self.num_heads, self.head_dim
        topk = self.active_topk()
        # Channels-last queries (last dim contiguous): what the SDPA kernels read without a copy, and the layout every
        # converter reads right (LiteRT's converter drops the transpose of a channels-first 1-head q k^T).
        q = self.q(x).permute(0, 2, 3, 1).reshape(B, H * W, nh, d).transpose(1, 2)  # (B, nh, N, d)
        kv = self.kv(up)  # (B, 2C, Hu, Wu)
        k, v = split_heads(kv, nh, d)  # (B, nh, M, d) each
        k_fine = v_fine = projection = None
        if topk:  # fine K/V of the selected tokens only where the BN statistics allow it, else of the whole map
            projection = self.fine_projection(x)
            if projection is None:
                k_fine, v_fine = split_heads(self.fine_keys_values(x), nh, d)
        elif self.training and self.kv_fine is None:
            self.track_fine_statistics(x)
        out, out_fine = pyramid_sparse_attention_parts(
            q, k, v, k_fine, v_fine, (H, W), (Hu, Wu), topk, self.threshold, self.backend, fine_projection=projection
        )  # (B, nh, N, d) each
        if out_fine is not None:
            if self.gate is not None:
                g = self.gate(torch.cat((out, out_fine), dim=-1)).sigmoid()  # eq. 7
                out = g * out_fine + (1 - g) * out  # eq. 8
            else:
                out = out + out_fine  # eq. 6
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return self.proj(out + self.positional_encoding(kv[:, C:], (H, W)))

    def positional_encoding(self, v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """CPE of the coarse V map v (B, C, Hu, Wu): 7x7 depthwise conv + BN, resized bilinearly to ``size`` (H, W);
        returns (B, C, H, W)."""
        return F.interpolate(self.pe(v), size=size, mode="bilinear", align_corners=False)
