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


# The stock Ultralytics config each PST config extends: every row except the two PST rows keeps the stock row's index,
# module and arguments, so `YOLO("yolo11n-seg-pst.yaml").load("yolo12n-seg.pt")` transfers the stock weights.
STOCK_COUNTERPARTS = {
    "yolo11-pst": "yolo12",
    "yolo11-seg-pst": "yolo12-seg",
    "yolo11-pose-pst": "yolo12-pose",
    "yolo11-obb-pst": "yolo12-obb",
    "yolo12-pst": "yolo12",
    "yolo12-seg-pst": "yolo12-seg",
    "yolo12-pose-pst": "yolo12-pose",
    "yolo12-obb-pst": "yolo12-obb",
    "yolo26-pst": "yolo26",
    "yolo26-seg-pst": "yolo26-seg",
    "yolo26-pose-pst": "yolo26-pose",
    "yolo26-obb-pst": "yolo26-obb",
    "yolo26-sem-pst": "yolo26-sem",
    "yolo26-depth-pst": "yolo26-depth",
    "yolo26-p2-pst": "yolo26-p2",
}


def stock_counterpart(name: str | Path) -> str | None:
    """The stock model a PST model extends, at the same scale: ``yolo11n-seg-pst.yaml`` -> ``yolo12n-seg.yaml``.

    Returns None for configs without a stock counterpart (ResNet-PST, classification, yolo11-c2psa-pst).
    """
    stem = Path(name).stem
    match = re.match(r"^(yolo\d+)([nslmx]?)(.*)$", stem)
    if not match:
        return None
    family, scale, rest = match.groups()
    stock = STOCK_COUNTERPARTS.get(family + rest)
    if stock is None:
        return None
    return re.sub(r"^(yolo\d+)", rf"\g<1>{scale}", stock) + ".yaml"
