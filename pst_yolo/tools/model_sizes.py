"""Model sizes: parameters and GFLOPs of every shipped config at every scale, beside the paper's numbers.

    pst-yolo sizes [--configs r18-pst yolo11-pst ...] [--markdown-out FILE] [--json-out FILE]
    pst-yolo sizes --markdown-out docs/MODEL_ZOO.md

Every model is measured fused, in eval mode, with the fine branch off (k=0: the coarse-only network as trained),
batch 1, by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs = 2 x multiply-adds):

- paper convention (:func:`paper_flops`): convolutions + linear layers at 640, counted as Ultralytics 8.3.x (the
  paper's tooling) did, on a 32x32 image scaled by (640/32)^2; stock YOLO11n gives 6.48, as Ultralytics prints;
- all (:func:`all_flops`): a real forward, every op the counter knows, attention matmuls included; at 640, and at
  224 for classification models (Table 3's caption says 224, its values match 640).

Configs that extend a stock model (``pst_yolo.configs.STOCK_COUNTERPARTS``: YOLOv11/12-PST for every task, YOLO26-PST)
get a second table (``--stock-markdown-out``): each beside its stock counterpart at the same scale, with the
state-dict items that ``YOLO(pst_yaml).load(stock.pt)`` transfers (:mod:`pst_yolo.tools.transfer`):

    pst-yolo sizes --configs yolo11-pst yolo11-seg-pst ... --scales n s --stock-markdown-out FILE
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from ultralytics.nn.tasks import (
    ClassificationModel,
    DepthModel,
    DetectionModel,
    OBBModel,
    PoseModel,
    SegmentationModel,
    SemanticSegmentationModel,
    guess_model_scale,
    guess_model_task,
    yaml_model_load,
)
from ultralytics.utils import YAML

from ..configs import STOCK_COUNTERPARTS, model_configs, stock_counterpart
from ..nn import set_topk
from ..ops import use_backend
from ..validation import argparse_type, check_output_file
from .transfer import transfer_report

IMGSZ = 640
CLS_IMGSZ = 224
PROFILE_SIZE = 32  # the paper's counter profiled a stride-sized image and scaled the count up to IMGSZ
MATCH_TOLERANCE = 0.02  # relative; a row reproduces the paper when params and paper GFLOPs are both this close
PAPER_FLOP_OPS = ("convolution", "addmm", "mm")  # aten ops of convolution and linear layers


@dataclass(frozen=True)
class PaperRow:
    """A row of the paper's Tables 1-3, values as printed (their decimals set the rounding tolerance).

    Attributes:
        name: The paper's row name.
        params_m: Parameters (M), as printed.
        gflops: GFLOPs, as printed.
        note: What we found about reproducing it.
    """

    name: str
    params_m: str
    gflops: str
    note: str = ""


N_NOTE = "no public layout gives this size; ours is the authors' layout at n"
CLS_NOTE = "the paper's GFLOPs count the classifier Linear 400 times (+1.02)"
# Keyed by the model's short name (a `model=` value without .yaml). Baselines are built from stock Ultralytics yamls.
PAPER_ROWS: dict[str, PaperRow] = {
    "yolo11n": PaperRow("YOLO11-N", "2.6", "6.5", "stock Ultralytics baseline"),
    "yolo11s": PaperRow("YOLO11-S", "9.4", "21.5", "stock Ultralytics baseline"),
    "yolo11m": PaperRow("YOLO11-M", "20.1", "68.0", "stock Ultralytics baseline"),
    "yolo12n": PaperRow("YOLO12-N", "2.6", "6.5", "stock Ultralytics baseline"),
    "yolo11n-pst": PaperRow("YOLOv11-PST-N", "2.8", "10.1", N_NOTE),
    "yolo11s-pst": PaperRow("YOLOv11-PST-S", "9.3", "21.0"),
    "yolo11m-pst": PaperRow("YOLOv11-PST-M", "19.5", "65.9", "GFLOPs match; for 19.5M params see yolo11m-c2psa-pst"),
    "yolo11m-c2psa-pst": PaperRow("YOLOv11-PST-M", "19.5", "65.9", "our variant: params match, GFLOPs lower"),
    "yolo12n-pst": PaperRow("YOLOv12-PST-N", "4.3", "15.8", "PST width not scaled (PSTFixedWidth)"),
    "r18-pst": PaperRow("R-18-PST-N (det)", "16.4", "42.5"),
    "r50-pst": PaperRow("R-50-PST-N (det)", "26.0", "71.9"),
    "r101-pst": PaperRow("R-101-PST-S (det)", "49.9", "138.5"),
    "yolo11n-cls-pst": PaperRow("YOLOv11-cls-PST-N", "3.5", "4.9", N_NOTE),
    "yolo11s-cls-pst": PaperRow("YOLOv11-cls-PST-S", "11.5", "19", CLS_NOTE),
    "r18-cls-pst": PaperRow("R-18-PST-N (cls)", "19.6", "43", CLS_NOTE),
    "r50-cls-pst": PaperRow("R-50-PST-N (cls)", "29.2", "72", CLS_NOTE),
    "r101-cls-pst": PaperRow("R-101-PST-S (cls)", "54.4", "140", CLS_NOTE),
}
BASELINES = ("yolo11n", "yolo11s", "yolo11m", "yolo12n")
TASK_MODELS = {
    "detect": DetectionModel,
    "segment": SegmentationModel,
    "pose": PoseModel,
    "obb": OBBModel,
    "classify": ClassificationModel,
    "semantic": SemanticSegmentationModel,
    "depth": DepthModel,
}
# Configs beyond the paper (other tasks, YOLO26): listed only in the stock-counterpart table.
EXTENSION_CONFIGS = frozenset(STOCK_COUNTERPARTS) - {"yolo11-pst", "yolo12-pst"}

MODEL_ZOO_INTRO = """# Model zoo: sizes

Parameters and GFLOPs of every shipped config at every scale it defines, with the paper's values (arXiv 2505.12772,
Tables 1-3) in parentheses. Generated by `{command}`; do not edit by hand.

Every model is built untrained from its YAML, fused (Conv+BN), in eval mode with the fine branch off (k=0: the
coarse-only network as trained), batch 1. FLOPs = 2 x multiply-adds, counted by
`torch.utils.flop_counter.FlopCounterMode`.

- **params M**: all parameters of the fused model (1000 classes for classification, 80 for detection).
- **GFLOPs, paper convention**: convolution + linear layers at 640, counted the way the paper's tooling (Ultralytics
  8.3.x) counted: a 32x32 image profiled and the count scaled by (640/32)^2; attention matmuls not counted. For
  convolutions this is exactly the count of a 640x640 forward (stock YOLO11n: 6.48). For classification models the
  classifier's Linear layer, which runs once per image, is counted 400 times (+1.02 GFLOPs at 1000 classes): that is
  how Table 3's values come about (its caption says 224; its values are 640 counted this way).
- **GFLOPs 640, all**: a real 640x640 forward, every op the counter knows, attention matmuls (A2C2f, C2PSA, PST
  coarse attention) included, the Linear layer counted once. This is what the model costs.
- **GFLOPs 224, all**: the same at 224x224, for classification models (ImageNet resolution).
- **note**: "reproduces" when params and paper-convention GFLOPs are both within 2% of the paper's value or round
  to it (the paper prints "19" for 18.57).

Model names are what `model=` takes (add `.yaml`): `yolo11n-pst.yaml` builds `yolo11-pst.yaml` at scale n. The ResNet
configs define one scale each, the paper's: `model=r18-pst.yaml` builds R-18-PST-N, `model=r101-pst.yaml` builds
R-101-PST-S (Ultralytics picks the only scale and logs "Assuming scale=...").
"""
MODEL_ZOO_NOTES = """
Findings behind the notes:

- The ResNet configs are the authors' layouts. Their "ResNet-18" is Ultralytics `ResNetLayer` stacks of bottleneck
  blocks (expansion 4) with [1, 2, 2, 2, 2] blocks per stage, not torchvision's basic-block ResNet-18.
- YOLOv11-PST-N (2.8M / 10.1) and YOLOv11-cls-PST-N (3.5M / 4.9): no public layout gives these sizes; the rows
  above are the authors' layouts at scale n.
- YOLOv11-PST-M: the authors' layout at m matches the GFLOPs, our YOLO11-backbone variant (`yolo11m-c2psa-pst`)
  matches the parameter count; neither matches both.
- YOLOv12-PST-N: the authors' layout with the PST output width not width-scaled (`PSTFixedWidth`).
- Scales the paper does not report (l, x, and s/m where it has no row) are provided to build and try.
- Configs for the other tasks (segment, pose, OBB) and YOLO26-PST, each beside the stock model it extends, with
  the number of stock tensors it takes over: [MODEL_ZOO_TASKS.md](MODEL_ZOO_TASKS.md).
"""


STOCK_TABLE_INTRO = """# Model zoo: every task, YOLO26-PST, and the stock model each config extends

Generated by `{command}`; do not edit by hand. The paper's configs, and how sizes are measured (fused, eval, k=0,
batch 1; GFLOPs in the paper's convention and all ops at 640): [MODEL_ZOO.md](MODEL_ZOO.md).

Each config below keeps the layer indices, modules and arguments of a stock Ultralytics model outside its two PST
rows, so a stock checkpoint gives it a head start: `YOLO("yolo11n-seg-pst.yaml").load("yolo12n-seg.pt")` (see the
README's "Head start from stock weights" and [HEAD_START.md](HEAD_START.md)). 80 classes, pose: 17 keypoints; the
stock model's values in parentheses. The last column counts the state-dict items (weights and BatchNorm statistics, as
Ultralytics' "Transferred N/M items" counts them) that loading the stock model's weights copies: all / of the PST
model's; every non-PST item / how many there are; plus items inside the PST rows that happen to match a stock item's
name and shape (the replaced block's input/output projections: Ultralytics copies those too).
"""
STOCK_TABLE_NOTES = """
- YOLOv11-PST (`yolo11*-pst`, the authors' layout) extends YOLO12 (`yolo12*`), as the authors built it; YOLOv12-PST
  (`yolo12*-pst`) too, with PST outputs not width-scaled (`PSTFixedWidth`, the paper's N size), so the layers that read
  the wider PST outputs (15, 17 and the head's P3 inputs) change shape and start untrained.
- YOLO26-PST (`yolo26*-pst`, needs Ultralytics >= 8.4) is YOLO26 with its two top-down C3k2 blocks replaced by PST,
  K/V from the map one level up (backbone P5 after C2PSA, backbone P4), end2end (NMS-free) head kept. The same two
  rows serve semantic segmentation (`yolo26*-sem-pst`, SemanticSegment head on P3/P4) and depth (`yolo26*-depth-pst`).
  The P2 variant (`yolo26*-p2-pst`) keeps its P2/4 top-down block a C3k2: a PST row there (25,600 queries over the
  6,400 P3 tokens at 640) would make YOLO26n-P2-PST 2.4x slower at k=0 and 3.5x at k=8 on a CPU (docs/DESIGN.md).
- YOLO26 sizes are fused models: fusing an end2end model drops its one-to-many training head, as Ultralytics does for
  inference, so they are below the parameter counts in Ultralytics' YAML comments.
- Every config builds at all five scales n/s/m/l/x (tests/test_model_sizes.py); none of these rows is in the paper.
"""


@dataclass
class ModelSize:
    """Measured size of one model (config x scale): fused, eval, k=0, batch 1.

    Attributes:
        model: Short name, e.g. ``yolo11n-pst`` (a ``model=`` value without ``.yaml``).
        config: The YAML file it is built from.
        scale: Scale letter used.
        task: ``detect``, ``segment``, ``pose``, ``obb`` or ``classify``.
        params_m: Parameters, millions.
        gflops: GFLOPs at 640 in the paper's convention (see :func:`paper_flops`).
        gflops_all: GFLOPs of a 640x640 forward, every op the counter knows (attention matmuls included).
        gflops_all_224: The same at 224x224 (classification models only).
    """

    model: str
    config: str
    scale: str
    task: str
    params_m: float
    gflops: float
    gflops_all: float
    gflops_all_224: float | None = None


@dataclass
class StockComparison:
    """A PST model beside the stock model it extends, and what a stock checkpoint gives it.

    Attributes:
        pst: Size of the PST model.
        stock: Size of its stock counterpart at the same scale.
        transfer: :meth:`pst_yolo.tools.transfer.TransferReport.summary` of loading the stock weights.
        outside_pst_missing: Non-PST items that do not transfer (shape changed by a wider PST output).
    """

    pst: ModelSize
    stock: ModelSize
    transfer: str
    outside_pst_missing: int


def load_config(config: str | Path, scale: str) -> dict:
    """Load a model YAML (a path, or a name Ultralytics or pst_yolo resolves offline) as a dict built at ``scale``."""
    d = copy.deepcopy(yaml_model_load(config))
    if scale not in (d.get("scales") or {}):
        raise ValueError(f"{config} defines no scale '{scale}'; it has {list(d.get('scales') or {})}.")
    d["scale"] = scale
    return d


def build_model(config: str | Path, scale: str) -> torch.nn.Module:
    """Build the Ultralytics model of ``config`` at ``scale`` (the task's model class), untrained."""
    d = load_config(config, scale)
    return TASK_MODELS[guess_model_task(d)](d, verbose=False)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def flops_per_op(model: torch.nn.Module, imgsz: int) -> dict[str, int]:
    """FLOPs of one forward on a (1, 3, imgsz, imgsz) input, per aten op name (e.g. ``convolution``, ``bmm``).

    Attention runs on the ``naive`` backend, whose matmuls the counter sees (it cannot see the CPU SDPA kernel).
    """
    x = torch.zeros(1, 3, imgsz, imgsz)
    with use_backend("naive"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {op.__name__: n for op, n in counter.get_flop_counts()["Global"].items()}


def paper_flops(model: torch.nn.Module, imgsz: int = IMGSZ) -> int:
    """Convolution + linear FLOPs the way the paper's tooling (Ultralytics 8.3.x) counted them.

    It profiled a stride-sized 32x32 image and scaled the count by (imgsz / 32)^2, ignoring attention matmuls. For
    convolutions this equals the count of an imgsz forward exactly; a classifier's Linear layer, which runs once per
    image, is scaled too (Classify at 1000 classes: 2.56 MFLOPs counted 400 times at 640, +1.02 GFLOPs).
    """
    per_op = flops_per_op(model, PROFILE_SIZE)
    return sum(n for op, n in per_op.items() if op in PAPER_FLOP_OPS) * (imgsz // PROFILE_SIZE) ** 2


def all_flops(model: torch.nn.Module, imgsz: int) -> int:
    """FLOPs of one (1, 3, imgsz, imgsz) forward, every op the counter knows (attention matmuls included)."""
    return sum(flops_per_op(model, imgsz).values())


def prepare_for_measuring(model: torch.nn.Module) -> torch.nn.Module:
    """Fuse Conv+BN, switch to eval and turn the fine branch off (k=0): the deployed coarse-only network."""
    model = model.fuse(verbose=False).eval()
    set_topk(model, 0)
    return model


def measure(config: str | Path, scale: str, name: str | None = None, model: torch.nn.Module | None = None) -> ModelSize:
    """Measure ``config`` at ``scale`` (or ``model`` built from it): fused, eval, k=0; 640 (and 224 for classifiers)."""
    model = model or build_model(config, scale)
    name = name or model_name(Path(config).stem, list(model.yaml["scales"]), scale)
    task = guess_model_task(model.yaml)
    model = prepare_for_measuring(model)
    return ModelSize(
        model=name,
        config=Path(config).name,
        scale=scale,
        task=task,
        params_m=round(count_params(model) / 1e6, 2),
        gflops=round(paper_flops(model) / 1e9, 2),
        gflops_all=round(all_flops(model, IMGSZ) / 1e9, 2),
        gflops_all_224=round(all_flops(model, CLS_IMGSZ) / 1e9, 2) if task == "classify" else None,
    )


def config_scales(config: Path) -> list[str]:
    """Scale letters a shipped config defines, in file order."""
    return list(YAML.load(config).get("scales") or {})


def model_name(stem: str, scales: list[str], scale: str) -> str:
    """Short name a user passes as ``model=``: the scale letter after the version digits (``yolo11n-pst``), or the
    config's own name when it defines one scale (``r18-pst``; Ultralytics then picks that scale)."""
    if len(scales) == 1:
        return stem
    return re.sub(r"(\d+)", rf"\g<1>{scale}", stem, count=1)


def shipped_models(names: list[str] | None = None) -> list[tuple[Path, str]]:
    """(config, scale) for every shipped config (or those whose stem is in ``names``) at every scale it defines."""
    configs = model_configs()
    if names:
        stems = {Path(n).stem for n in names}
        unknown = stems - {c.stem for c in configs}
        if unknown:
            shipped = [c.stem for c in configs]
            raise SystemExit(f"pst-yolo sizes: unknown config(s) {sorted(unknown)}; shipped: {shipped}")
        configs = [c for c in configs if c.stem in stems]
    return [(c, s) for c in configs for s in config_scales(c)]


def within_paper_precision(ours: float, printed: str) -> bool:
    """Whether ``ours`` is within ``MATCH_TOLERANCE`` of a printed paper value, or rounds to it (``19`` ~ 18.5-19.5)."""
    paper = float(printed)
    decimals = len(printed.partition(".")[2])
    return abs(ours - paper) <= max(MATCH_TOLERANCE * paper, 0.5 * 10**-decimals)


def reproduces(size: ModelSize, row: PaperRow) -> bool:
    """Whether params and paper-convention GFLOPs both match the paper's row (see :func:`within_paper_precision`)."""
    return within_paper_precision(size.params_m, row.params_m) and within_paper_precision(size.gflops, row.gflops)


def verdict(size: ModelSize) -> str:
    """The table's note: which paper row this model is and whether it reproduces it."""
    row = PAPER_ROWS.get(size.model)
    if row is None:
        return "not in the paper"
    status = "reproduces" if reproduces(size, row) else "does not reproduce"
    return f"{status} {row.name}" + (f"; {row.note}" if row.note else "")


def markdown_table(sizes: list[ModelSize]) -> str:
    """Markdown table: our params and GFLOPs with the paper's in parentheses, and a verdict per row."""
    lines = [
        "| model | config | params M (paper) | GFLOPs, paper convention (paper) | GFLOPs 640, all | GFLOPs 224, all "
        "| note |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        row = PAPER_ROWS.get(s.model)
        params, gflops = f"{s.params_m:.2f}", f"{s.gflops:.2f}"
        if row:
            params, gflops = f"{params} ({row.params_m})", f"{gflops} ({row.gflops})"
        at_224 = "" if s.gflops_all_224 is None else f"{s.gflops_all_224:.2f}"
        lines.append(
            f"| `{s.model}` | {s.config} | {params} | {gflops} | {s.gflops_all:.2f} | {at_224} | {verdict(s)} |"
        )
    return "\n".join(lines) + "\n"


def compare_with_stock(config: Path, scale: str, measured_stock: dict[str, ModelSize] | None = None) -> StockComparison:
    """Measure ``config`` at ``scale`` and its stock counterpart, and count the stock items its ``load`` transfers.

    ``measured_stock`` caches stock sizes by YAML name (yolo11-pst and yolo12-pst extend the same yolo12 models).
    """
    measured_stock = {} if measured_stock is None else measured_stock
    pst_model = build_model(config, scale)
    stock_yaml = stock_counterpart(model_name(config.stem, config_scales(config), scale))
    stock_model = build_model(stock_yaml, scale)
    report = transfer_report(pst_model, stock_model)  # before fusing: checkpoints hold unfused weights
    if stock_yaml not in measured_stock:
        measured_stock[stock_yaml] = measure(stock_yaml, scale, Path(stock_yaml).stem, model=stock_model)
    return StockComparison(
        pst=measure(config, scale, model=pst_model),
        stock=measured_stock[stock_yaml],
        transfer=report.summary(),
        outside_pst_missing=len(report.outside_pst_missing),
    )


def stock_comparison_table(rows: list[StockComparison]) -> str:
    """Markdown table: each PST model's params and GFLOPs (both conventions) beside its stock counterpart's."""
    lines = [
        "| model | task | params M (stock) | GFLOPs, paper convention (stock) | GFLOPs 640, all (stock) | stock model "
        "| items transferred from the stock checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s = r.pst, r.stock
        lines.append(
            f"| `{p.model}` | {p.task} | {p.params_m:.2f} ({s.params_m:.2f}) | {p.gflops:.2f} ({s.gflops:.2f}) "
            f"| {p.gflops_all:.2f} ({s.gflops_all:.2f}) | `{s.model}` | {r.transfer} |"
        )
    return "\n".join(lines) + "\n"


def markdown_document(sizes: list[ModelSize], command: str) -> str:
    """MODEL_ZOO.md: how the numbers were measured, the command that wrote them, and the table."""
    return MODEL_ZOO_INTRO.format(command=command) + "\n" + markdown_table(sizes) + MODEL_ZOO_NOTES


def stock_markdown_document(comparisons: list[StockComparison], command: str) -> str:
    """MODEL_ZOO_TASKS.md: every config that extends a stock model, beside it, with the transfer counts."""
    return STOCK_TABLE_INTRO.format(command=command) + "\n" + stock_comparison_table(comparisons) + STOCK_TABLE_NOTES


def measure_all(
    names: list[str] | None = None, scales: list[str] | None = None
) -> tuple[list[ModelSize], list[StockComparison]]:
    """Measure every shipped config at every scale (only those named / at ``scales``, if given), after the baselines.

    Returns:
        The paper table's sizes (configs of the paper's families) and the stock comparisons (configs that extend a
        stock model, :data:`pst_yolo.configs.STOCK_COUNTERPARTS`).
    """
    models = [(c, s) for c, s in shipped_models(names) if not scales or s in scales]
    baselines = [] if names else [measure(f"{b}.yaml", guess_model_scale(f"{b}.yaml"), b) for b in BASELINES]
    measured_stock: dict[str, ModelSize] = {}
    comparisons = [compare_with_stock(c, s, measured_stock) for c, s in models if c.stem in STOCK_COUNTERPARTS]
    measured = {(r.pst.config, r.pst.scale): r.pst for r in comparisons}
    sizes = [measured.get((c.name, s)) or measure(c, s) for c, s in models if c.stem not in EXTENSION_CONFIGS]
    return baselines + sizes, comparisons


def main(argv: list[str] | None = None) -> None:
    """``pst-yolo sizes``: print the size table as Markdown; optionally write MODEL_ZOO-style Markdown and JSON."""
    parser = argparse.ArgumentParser(prog="pst-yolo sizes", description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", metavar="NAME", help="only these shipped configs (e.g. r18-pst)")
    output = argparse_type(check_output_file, "output file", parse=Path)
    parser.add_argument("--markdown-out", type=output, metavar="FILE", help="write the table, with how it was measured")
    parser.add_argument("--json-out", type=output, metavar="FILE", help="write the measurements as JSON")
    parser.add_argument("--scales", nargs="+", metavar="S", help="only these scale letters (e.g. n s)")
    parser.add_argument(
        "--stock-markdown-out", type=output, metavar="FILE", help="write the table of configs beside their stock model"
    )
    args = parser.parse_args(argv)
    sizes, comparisons = measure_all(args.configs, args.scales)
    if sizes:
        print(markdown_table(sizes), end="")
    if comparisons:
        print(stock_comparison_table(comparisons), end="")
    command = " ".join(["pst-yolo sizes", *(argv if argv is not None else sys.argv[1:])])
    if args.markdown_out:
        args.markdown_out.write_text(markdown_document(sizes, command))
    if args.stock_markdown_out:
        args.stock_markdown_out.write_text(stock_markdown_document(comparisons, command))
    if args.json_out:
        measured = [asdict(s) for s in sizes] + [asdict(c) for c in comparisons]
        args.json_out.write_text(json.dumps(measured, indent=2) + "\n")


if __name__ == "__main__":
    main()
