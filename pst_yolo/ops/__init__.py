"""Pure tensor operations of the Pyramid Sparse Transformer (no Ultralytics import)."""

from .backends import BACKENDS, attention, get_backend, resolve_backend, set_backend, use_backend
from .pyramid_sparse_attention import (
    FineProjection,
    coarse_attention_with_scores,
    coarse_key_scores,
    pyramid_sparse_attention,
    pyramid_sparse_attention_parts,
    select_fine_tokens,
)

__all__ = (
    "BACKENDS",
    "FineProjection",
    "attention",
    "coarse_attention_with_scores",
    "coarse_key_scores",
    "get_backend",
    "pyramid_sparse_attention",
    "pyramid_sparse_attention_parts",
    "resolve_backend",
    "select_fine_tokens",
    "set_backend",
    "use_backend",
)
