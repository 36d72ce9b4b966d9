"""``pst-yolo bench``: latency and memory of the PSA op, of PST models against the stock ones (PyTorch and ONNX
Runtime) and of a training step, with Markdown tables and plots (see :mod:`.cli` for the options)."""

from .cli import main

__all__ = ["main"]
