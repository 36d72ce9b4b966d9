"""PST nn modules built from Ultralytics ``Conv`` (so ``fuse()`` folds their BatchNorms)."""

from .psa import PSAttn
from .pst import PST, PSAttnBlock, set_topk

__all__ = ("PST", "PSAttn", "PSAttnBlock", "set_topk")
