"""pst-yolo: the Pyramid Sparse Transformer (arXiv 2505.12772) as an Ultralytics YOLO plugin.

``import pst_yolo`` registers the PST modules into Ultralytics' YAML model parser.
"""

from .integration import register
from .nn import PST, PSAttn, PSAttnBlock, set_topk
from .ops import get_backend, pyramid_sparse_attention, set_backend, use_backend

__version__ = "0.2.0"
__all__ = (
    "PST",
    "PSAttn",
    "PSAttnBlock",
    "get_backend",
    "pyramid_sparse_attention",
    "set_backend",
    "set_topk",
    "use_backend",
)

register()
