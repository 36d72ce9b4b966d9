"""``pst-yolo`` / ``python -m pst_yolo``: the stock ``yolo`` command plus pst-yolo's keys and tools.

    pst-yolo val model=best.pt data=data.yaml topk=8        # any `yolo` command; topk=K sets the PSA top-k
    pst-yolo export model=best.pt format=onnx topk=0 attn_backend=sdpa
    pst-yolo demo | bench | heatmap | convert | sizes | topk | check | recalibrate ...   # tools (each takes -h)

``topk=K`` (0 = coarse attention only) applies to every PSA module of the loaded model for val/predict/export (and
to the validation passes of train); ``attn_backend=`` picks auto|naive|sdpa|flash|sage. Other keys go to ``yolo``.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {  # subcommand -> module with main(argv)
    "demo": "pst_yolo.tools.demo",
    "bench": "pst_yolo.tools.bench",
    "heatmap": "pst_yolo.tools.heatmap",
    "convert": "pst_yolo.tools.convert",
    "sizes": "pst_yolo.tools.model_sizes",
    "topk": "pst_yolo.tools.topk",
    "check": "pst_yolo.tools.check",
    "recalibrate": "pst_yolo.tools.recalibrate",
}


def split_plugin_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Separate pst-yolo keys (``topk=``, ``attn_backend=``) from the arguments meant for ``yolo``."""
    ours, rest = {}, []
    for a in args:
        key, sep, value = a.lstrip("-").partition("=")
        if sep and key in ("topk", "attn_backend"):
            ours[key] = value
        else:
            rest.append(a)
    return ours, rest


def warn_if_no_psa(args: list[str], topk: str) -> None:
    """Warn that ``topk=K`` does nothing when the ``model=`` of a ``yolo`` command has no PSA module (as
    ``pst-yolo demo`` refuses the same)."""
    from ultralytics.utils import LOGGER

    from .integration import has_psa_modules

    model = next((a.split("=", 1)[1] for a in args if a.lstrip("-").startswith("model=")), None)
    if model and has_psa_modules(model) is False:
        LOGGER.warning(f"pst-yolo: topk={topk} has no effect: {model} has no PSA module (it is not a PST model).")


def main(argv: list[str] | None = None) -> None:
    """Run a pst-yolo tool, or the stock Ultralytics entrypoint with pst-yolo's keys applied."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS:
        importlib.import_module(TOOLS[args[0]]).main(args[1:])
        return
    ours, rest = split_plugin_args(args)
    from ultralytics.cfg import entrypoint

    import pst_yolo

    if "topk" in ours:
        try:
            pst_yolo.PSAttn.override_topk(int(ours["topk"]))
        except ValueError:
            raise SystemExit(f"pst-yolo: topk must be a non-negative integer, got '{ours['topk']}'.") from None
        warn_if_no_psa(rest, ours["topk"])
    if "attn_backend" in ours:
        try:
            pst_yolo.set_backend(ours["attn_backend"])
        except ValueError as e:
            raise SystemExit(f"pst-yolo: attn_backend: {e}") from None
    sys.argv[:] = ["yolo", *rest]  # Ultralytics reads its own alias of sys.argv
    entrypoint()


if __name__ == "__main__":
    main()
