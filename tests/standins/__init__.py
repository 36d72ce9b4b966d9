"""Contract stand-ins of the CUDA-only attention packages, for tests on machines without a GPU.

``flash_attn`` (flash-attn 2.8.x) and ``sageattention`` (1.0.6) are written here in plain PyTorch from the upstream
sources cited in each module: same call signature, layout, dtype rules, head-dim limits, return values and refusals,
and a numerical model of what the kernels compute (precision of each step), so pst_yolo's adapters can be checked on
CPU tensors. They are installed into ``sys.modules`` by :func:`install_standins` (a test fixture) and never by
package code; the one contract point they do not mirror is the refusal of CPU tensors.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

STANDINS = ("flash_attn", "sageattention")
ROOT = Path(__file__).parent


def load_standin(name: str):
    """Import the stand-in package ``name`` from this folder under its real name (with a module spec)."""
    spec = importlib.util.spec_from_file_location(
        name, ROOT / name / "__init__.py", submodule_search_locations=[str(ROOT / name)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: the package's relative imports look it up
    spec.loader.exec_module(module)
    return module


def install_standins(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = STANDINS) -> dict:
    """Put the stand-ins in ``sys.modules`` for one test (monkeypatch restores the previous state)."""
    modules = {}
    for name in names:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, key)
        monkeypatch.setitem(sys.modules, name, None)  # registers the key so monkeypatch removes it afterwards
        modules[name] = load_standin(name)
        for key in [k for k in sys.modules if k.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, key, sys.modules[key])
    return modules
