"""Where the shipped model YAMLs and recipes live: ``cfg/`` in a checkout, ``pst_yolo/cfg/`` in an installed wheel."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CFG_DIR = next((p for p in (PACKAGE_DIR / "cfg", PACKAGE_DIR.parent / "cfg") if p.is_dir()), PACKAGE_DIR / "cfg")
MODELS_DIR = CFG_DIR / "models"


def model_configs() -> list[Path]:
    """All shipped model YAMLs (one per family; the scale letter selects n/s/m/l/x)."""
    return sorted(MODELS_DIR.glob("*.yaml"))


def find_model_config(name: str | Path) -> Path | None:
    """Resolve a short name like ``yolo11n-pst.yaml`` or ``yolo11-pst.yaml`` to a shipped YAML, else None.

    The scale letter after the version digits is dropped (``yolo11n-pst`` -> ``yolo11-pst``), as Ultralytics does.
    """
    stem = Path(name).name
    for candidate in (stem, re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem)):
        path = MODELS_DIR / candidate
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path
    return None
