"""Pure tensor operations of the Pyramid Sparse Transformer (no Ultralytics import).

Where each part of the paper's Section 3.1 lives:

- ``reference.py``: eq. 1-6 written to be read (plain, dense PyTorch); the definition the tests hold the rest to.
- ``pyramid_sparse_attention.py``: the op the modules call: eq. 2-5 with arguments checked once, the one dispatch
  among the coarse passes, the top-k selection of eq. 4 and the fine attention of eq. 5.
- ``blocked_pass.py``: eq. 2 + eq. 3 in one pass over query blocks (the ``fused`` coarse pass; CPU fast paths).
- ``score_pass.py``: eq. 3 after an attention kernel (the ``kernel`` coarse pass), from its log-sum-exp if any.
- ``backends.py``: the attention kernels (naive, SDPA, flash-attn, SageAttention) behind one switch.
- ``export_compat.py``: the graph form for exporters and the table of converter workarounds.
- ``statistics.py``: the fine map's BatchNorm statistics of eq. 4's shared projection.
"""

from .backends import BACKENDS, attention, get_backend, resolve_backend, set_backend, use_backend
from .pyramid_sparse_attention import (
    FineProjection,
    coarse_attention_with_scores,
    coarse_key_scores,
    pyramid_sparse_attention,
    pyramid_sparse_attention_parts,
    select_fine_tokens,
)
from .reference import pyramid_sparse_attention_reference

__all__ = (
    "BACKENDS",
    "FineProjection",
    "attention",
    "coarse_attention_with_scores",
    "coarse_key_scores",
    "get_backend",
    "pyramid_sparse_attention",
    "pyramid_sparse_attention_parts",
    "pyramid_sparse_attention_reference",
    "resolve_backend",
    "select_fine_tokens",
    "set_backend",
    "use_backend",
)
