"""Stand-in of ``sageattention`` 1.0.6 for tests (see tests/standins/__init__.py): exports ``sageattn``."""

from .core import sageattn

__all__ = ("sageattn",)
