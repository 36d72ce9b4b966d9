"""Stand-in of ``flash_attn`` 2.8.x for tests (see tests/standins/__init__.py): exports ``flash_attn_func``."""

from .flash_attn_interface import flash_attn_func

__version__ = "2.8.3+standin"
__all__ = ("flash_attn_func",)
