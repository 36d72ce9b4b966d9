"""The paper's training recipes (Table 5) as Ultralytics cfg override files.

Each recipe is a YAML of Ultralytics train arguments, without ``model``, ``data``, ``task`` or ``mode``, meant for
``yolo train cfg=PATH model=... data=...`` or ``YOLO(model).train(cfg=PATH, data=...)``.

Examples:
    >>> from pst_yolo.recipes import load_recipe, recipe_path
    >>> recipe_path("det-n").name
    'pst-det-n.yaml'
    >>> load_recipe("cls")["lr0"]
    0.2
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .configs import CFG_DIR

RECIPES = {"det-n": "pst-det-n.yaml", "det-s": "pst-det-s.yaml", "det-m": "pst-det-m.yaml", "cls": "pst-cls.yaml"}

RECIPES_DIR = CFG_DIR / "recipes"


def recipe_path(name: str) -> Path:
    """Path of the recipe YAML called ``name`` ('det-n', 'det-s', 'det-m' or 'cls').

    Raises:
        FileNotFoundError: ``name`` is not a recipe, or its file is missing from this installation.
    """
    filename = RECIPES.get(name)
    if filename is None:
        raise FileNotFoundError(f"unknown PST recipe {name!r}; valid names are {sorted(RECIPES)}")
    path = RECIPES_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"PST recipe {name!r} ({filename}) is missing from {RECIPES_DIR}.")
    return path


def load_recipe(name: str) -> dict:
    """The recipe ``name`` as a dict of Ultralytics train arguments (see ``recipe_path``)."""
    with open(recipe_path(name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def parse_overrides(pairs: list[str]) -> dict:
    """Command-line ``["epochs=300", "lr0=0.1"]`` -> ``{"epochs": 300, "lr0": 0.1}`` (Ultralytics' value parsing)."""
    from ultralytics.cfg import smart_value

    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"Overrides must be key=value, got {bad}.")
    return {k: smart_value(v) for k, v in (p.split("=", 1) for p in pairs)}
