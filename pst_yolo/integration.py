"""The module that touches Ultralytics internals: YAML parsing of PST rows, fusing, safe loading, NCNN guard (and,
through :mod:`pst_yolo.int8_export`, INT8 export keeping PST's attention in float).

``register()`` (run by ``import pst_yolo``) wraps ``ultralytics.nn.tasks.parse_model``: a model YAML without PST rows
goes straight to the stock parser. With PST rows, each row ``[[fine, upper], n, PST, [c2, mlp_ratio, e, k]]`` is
first parsed by the stock code as ``[fine, n, C2f, [c2]]`` (``PSTFixedWidth``: ``HGBlock``, c2 unscaled), which
gives a stock block's channel inference (``c1 = ch[fine]``, ``c2`` width-scaled and capped by ``max_channels``,
``n`` depth-scaled). A dry forward of that stand-in network reads every layer's output shape, which gives
``c_up = ch[upper]`` and checks that the upper map is half the fine map; then each stand-in is swapped for the real
:class:`~pst_yolo.nn.PST`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import ultralytics
from ultralytics.nn import tasks
from ultralytics.nn.modules import C2f, Conv, HGBlock
from ultralytics.utils import LOGGER
from ultralytics.utils.checks import check_version

from . import int8_export
from .configs import find_model_config
from .nn import PST, PSAttn, PSAttnBlock
from .validation import check_int, check_type

PLUGIN_MODULES = {"PST": PST, "PSTFixedWidth": PST}  # PSTFixedWidth: c2 taken as is, never width-scaled
SAFE_GLOBALS = (PST, PSAttnBlock, PSAttn)
PROBE_SIZE = 128  # dry-run input size (pixels) used to read channels and map sizes (P6/64: 2x2)


class PluginBuildError(ValueError):
    """A PST row of a model YAML cannot be built; the message names the layer index."""


def _incompatible(what: str) -> RuntimeError:
    return RuntimeError(
        f"pst_yolo cannot hook Ultralytics {ultralytics.__version__}: {what}. "
        "pst_yolo supports ultralytics>=8.4.190,<8.5; install a supported version."
    )


def check_required_ultralytics(d: dict) -> None:
    """Stop with a clear error when the YAML's ``requires_ultralytics: "X.Y.Z"`` is newer than the installed version.

    YOLO26-PST configs need Ultralytics 8.4 (YOLO26 heads, ``end2end``); an older parser would fail on an unknown
    module name or, worse, build a different head without saying so.
    """
    required = d.get("requires_ultralytics")
    if required and not check_version(ultralytics.__version__, f">={required}"):
        name = d.get("yaml_file", "this model YAML")
        raise PluginBuildError(
            f"{name} needs Ultralytics >= {required}, but {ultralytics.__version__} is installed; "
            f"pip install -U 'ultralytics>={required}'."
        )


def _plugin_rows(d: dict) -> list[int]:
    """Indices of the rows whose module is a pst_yolo module."""
    rows = d.get("backbone", []) + d.get("head", [])
    return [i for i, row in enumerate(rows) if isinstance(row, list) and len(row) > 2 and row[2] in PLUGIN_MODULES]


def check_scale(d: dict) -> None:
    """Raise a clear error when the scale letter of the model name (``d["scale"]``) is not among the YAML's scales.

    Stock Ultralytics fails there with ``KeyError: 'm'``.
    """
    scales, scale = d.get("scales"), d.get("scale")
    if scales and scale and scale not in scales:
        name = d.get("yaml_file", "the model YAML")
        raise ValueError(
            f"{name} asks for scale '{scale}' (the letter after the version in the model name), but its 'scales' are "
            f"{', '.join(scales)}; use one of them, e.g. {_with_scale(str(name), scale, next(iter(scales)))}."
        )


def _with_scale(name: str, scale: str, other: str) -> str:
    """The model file name with its scale letter swapped: ``yolo11m-pst.yaml`` -> ``yolo11n-pst.yaml``."""
    stem = Path(name).name
    renamed = re.sub(rf"(yolo(?:e-)?v?\d+){scale}", rf"\g<1>{other}", stem, count=1)
    return renamed if renamed != stem else f"a name with scale '{other}'"


def _check_row(i: int, row: list) -> None:
    """Raise PluginBuildError unless PST row ``i`` is ``[[fine, upper], n, PST, [c2, (mlp_ratio, e, k)]]``."""
    where = f"YAML layer {i}: PST"
    if len(row) != 4:
        raise PluginBuildError(f"{where} row must be [[fine, upper], n, PST, [c2, mlp_ratio, e, k]], got {row!r}.")
    f, n, _, args = row
    if not isinstance(f, (list, tuple)) or len(f) != 2:
        raise PluginBuildError(
            f"{where} needs 'from' = [fine, upper] (two inputs: the fine map and its upper map), got {f!r}."
        )
    for j in f:
        if isinstance(j, bool) or not isinstance(j, int) or not (-i <= j < i):
            raise PluginBuildError(f"{where} input {j!r} in 'from' {f} is not an earlier layer (missing upper map?).")
    try:
        check_int(n, "n (repeats)", where, minimum=1)
        check_type(args, "args", list, "a list [c2, mlp_ratio, e, k]", where)
        if not 1 <= len(args) <= 4:
            raise ValueError(f"{where} args must be [c2, mlp_ratio, e, k] (c2 first, the rest optional), got {args}.")
        check_int(args[0], "c2 (args[0])", where, minimum=1)
    except (TypeError, ValueError) as e:
        raise PluginBuildError(str(e)) from None


def _stand_in_dict(d: dict, rows: list[int]) -> dict:
    """A deep copy of the YAML dict with every PST row replaced by a stock stand-in row reading the fine map."""
    d = copy.deepcopy(d)
    layers = d["backbone"] + d["head"]
    for i in rows:
        _check_row(i, layers[i])
        f, n, row_module, args = layers[i]
        if row_module == "PST":  # stock C2f(c1, c2, n): c2 width-scaled and capped, n depth-scaled, like stock blocks
            layers[i][:] = [f[0], n, "C2f", [args[0]]]
        else:  # stock HGBlock(c1, cm, c2, k, n) keeps c2 as given; cm=8, k=1 keep the throw-away stand-in cheap
            layers[i][:] = [f[0], n, "HGBlock", [8, args[0], 1]]
    return d


def _layer_output_shapes(layers: nn.Sequential, ch: int, pst_inputs: dict[int, list[int]]) -> list[torch.Size]:
    """Run a no-grad dry forward of a parsed Sequential (routing by each layer's ``f``) up to the last PST row, which
    needs no more; return the output shape of each layer before it.

    The pyramid of each PST row (``pst_inputs``: layer index -> [fine, upper]) is checked as soon as its inputs
    exist, so that a wrong row is reported as itself, not as the failure of a later layer; a layer that fails on the
    dry run is named too. (Ultralytics' own stride probe runs the whole model next.)
    """
    outputs, shapes, last_row = [], [], max(pst_inputs)
    x = torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE)
    with torch.no_grad():
        for i, m in enumerate(layers.eval()):
            if i in pst_inputs:
                _check_pyramid(i, pst_inputs[i], shapes)
                if i == last_row:
                    break
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            try:
                x = m(x)
            except (RuntimeError, ValueError, TypeError) as e:
                raise PluginBuildError(
                    f"YAML layer {i} ({type(m).__name__}, from {m.f}) fails on a {PROBE_SIZE}px dry run: {e}"
                ) from e
            outputs.append(x)
            shapes.append(x.shape if isinstance(x, torch.Tensor) else None)
    return shapes


def _check_pyramid(index: int, f: list[int], shapes: list) -> None:
    """Raise PluginBuildError unless PST row ``index`` reads a fine map and its half-size upper map, in that order."""
    fine, upper = (shapes[j % index] for j in f)
    if upper is None or fine is None:
        raise PluginBuildError(f"YAML layer {index}: PST inputs {f} must be single feature maps.")
    expected = ((fine[2] + 1) // 2, (fine[3] + 1) // 2)
    if tuple(upper[2:]) != expected:
        swapped = upper[2] * upper[3] > fine[2] * fine[3]
        hint = f"; swapped? write 'from' as [fine, upper] = [{f[1]}, {f[0]}]" if swapped else ""
        raise PluginBuildError(
            f"YAML layer {index}: PST upper map (layer {f[1]}, {upper[2]}x{upper[3]} at {PROBE_SIZE}px input) must be "
            f"half the fine map (layer {f[0]}, {fine[2]}x{fine[3]}), i.e. {expected[0]}x{expected[1]}{hint}."
        )


def _build_pst(stand_in: nn.Module, row: list, index: int, shapes: list) -> nn.Module:
    """Replace the stand-in of layer ``index`` (a stock C2f or HGBlock) with the real PST."""
    f, _, _, args = row
    if type(stand_in) is HGBlock:
        c1, c2, n = stand_in.m[0].conv.in_channels, stand_in.ec.conv.out_channels, len(stand_in.m)
    elif type(stand_in) is C2f:
        c1, c2, n = stand_in.cv1.conv.in_channels, stand_in.cv2.conv.out_channels, len(stand_in.m)
    else:
        raise _incompatible(f"the stand-in of PST layer {index} was built as {type(stand_in).__name__}")
    upper = shapes[f[1] % index]  # the pyramid was checked on the dry run
    try:
        module = PST(c1, upper[1], c2, n, *args[1:])
    except (TypeError, ValueError) as e:
        raise PluginBuildError(f"YAML layer {index}: {e}") from e
    module.np = sum(p.numel() for p in module.parameters())
    module.i, module.f, module.type = index, f, f"{PST.__module__}.{PST.__name__}"
    module.args = [c1, upper[1], c2, n, *args[1:]]  # resolved constructor arguments, for the layer table
    return module


class _HeldLogRecords(logging.Filter):
    """Logging filter that holds back every record, to re-emit the stock layer table once PST rows are real."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        self.records.append(record)
        return False


def _emit_layer_table(records: list, layers: nn.Sequential, rows: list[int]) -> None:
    """Re-log the stock parser's table, with each stand-in row replaced by its PST row (same column layout)."""
    for record in records:
        index = record.getMessage()[:3].strip()
        if index.isdigit() and int(index) in rows:
            m = layers[int(index)]
            record.msg, record.args = (
                f"{m.i:>3}{m.f!s:>20}{len(m.blocks):>3}{m.np:10.0f}  {m.type:<45}{m.args!s:<30}",
                None,
            )
        LOGGER.handle(record)


def parse_model_with_plugins(stock_parse_model, d, ch, verbose=True):
    """``parse_model`` that also builds pst_yolo rows; stock YAMLs go to the stock parser untouched."""
    check_required_ultralytics(d)
    check_scale(d)
    rows = _plugin_rows(d)
    if not rows:
        return stock_parse_model(d, ch, verbose)
    held = _HeldLogRecords()  # the stand-in rows' table lines are fixed before they are shown
    LOGGER.addFilter(held)
    try:
        layers, save = stock_parse_model(_stand_in_dict(d, rows), ch, verbose)
    finally:
        LOGGER.removeFilter(held)
    table = d["backbone"] + d["head"]
    shapes = _layer_output_shapes(layers, ch, {i: table[i][0] for i in rows})
    for i in rows:
        layers[i] = _build_pst(layers[i], table[i], i, shapes)
        save.extend(j % i for j in table[i][0] if j != -1)
    layers.train()
    _emit_layer_table(held.records, layers, rows)
    return layers, sorted(set(save))


def has_psa_modules(model: str) -> bool | None:
    """Whether a model file (a ``.pt`` checkpoint or a model YAML) holds PSA modules; None when it cannot tell.

    A checkpoint is read through the class names in its pickle only (nothing is unpickled), a YAML through its rows.
    """
    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        try:
            return bool(_plugin_rows(tasks.yaml_model_load(model)))
        except (OSError, ValueError, KeyError, TypeError):  # Ultralytics reports an unreadable YAML itself
            return None
    if path.suffix == ".pt" and path.is_file():
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save's format: <name>/data.pkl holds the pickle
                pickle_name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                return f"{PSAttn.__module__}\n".encode() in archive.read(pickle_name)  # a GLOBAL opcode's module
        except (OSError, zipfile.BadZipFile, StopIteration):
            return None
    return None


def fuse_with_fine_norm(stock_fuse, self, *args, **kwargs):
    """``BaseModel.fuse`` that first folds each PSA module's fine-map K/V statistics (kv's BN is fused away)."""
    for m in self.modules():
        if isinstance(m, PSAttn):
            m.fold_fine_norm()
    return stock_fuse(self, *args, **kwargs)


def check_yaml_with_plugin_configs(stock_check_yaml, file, *args, **kwargs):
    """``check_yaml`` that also finds pst_yolo's shipped model YAMLs by short name (e.g. ``yolo11n-pst.yaml``)."""
    found = stock_check_yaml(file, *args, **{**kwargs, "hard": False})
    if found:
        return found
    shipped = find_model_config(file)
    return str(shipped) if shipped else stock_check_yaml(file, *args, **kwargs)


def refuse_fine_attention_for_ncnn(stock_torch2ncnn, model: nn.Module, *args, **kwargs):
    """``torch2ncnn`` (Ultralytics' NCNN export) that refuses a model whose PSA modules would run the fine attention.

    ncnn has no TopK, Gather or compare layer: pnnx drops those ops with a log line only, and the exported model
    would silently run without the fine branch. The coarse-only model (top-k 0) exports and matches PyTorch.
    """
    active = [m.active_topk() for m in model.modules() if isinstance(m, PSAttn)]
    if any(active):
        raise ValueError(
            f"NCNN export cannot carry PST's fine attention (top-k {max(active)} in {sum(k > 0 for k in active)} PSA "
            "modules): ncnn has no TopK/Gather layers, so the exported model would silently run without it. Export "
            "the coarse-only model (top-k 0) instead: `pst-yolo export model=... format=ncnn topk=0`, or "
            "`pst_yolo.set_topk(yolo.model, 0)` before `yolo.export(format='ncnn')`."
        )
    return stock_torch2ncnn(model, *args, **kwargs)


def _guard_ncnn_export() -> None:
    """Wrap ``ultralytics.utils.export.ncnn.torch2ncnn`` (looked up at each export) with the top-k check."""
    try:
        ncnn_export = importlib.import_module("ultralytics.utils.export.ncnn")
    except ImportError:  # Ultralytics < 8.4 exports NCNN inline: no hook point, no guard
        return
    stock = ncnn_export.torch2ncnn
    ncnn_export.torch2ncnn = functools.wraps(stock)(functools.partial(refuse_fine_attention_for_ncnn, stock))


def register() -> None:
    """Make Ultralytics build, fuse and safely load PST models. Idempotent."""
    if getattr(tasks.parse_model, "_pst_yolo", False):
        return
    if not callable(getattr(tasks, "parse_model", None)) or not hasattr(tasks.BaseModel, "fuse"):
        raise _incompatible("ultralytics.nn.tasks.parse_model or BaseModel.fuse is missing")
    if any(getattr(tasks, m.__name__, None) is not m for m in (C2f, Conv, HGBlock)):
        raise _incompatible("ultralytics.nn.tasks does not resolve 'C2f'/'Conv'/'HGBlock' to the stock modules")
    for name, module in PLUGIN_MODULES.items():
        setattr(tasks, name, module)  # YAML names resolve through the globals of ultralytics.nn.tasks
    parse = functools.wraps(tasks.parse_model)(functools.partial(parse_model_with_plugins, tasks.parse_model))
    parse._pst_yolo = True
    tasks.parse_model = parse
    stock_fuse = tasks.BaseModel.fuse
    tasks.BaseModel.fuse = functools.wraps(stock_fuse)(
        lambda self, *a, **k: fuse_with_fine_norm(stock_fuse, self, *a, **k)
    )
    if not callable(getattr(tasks, "check_yaml", None)):
        raise _incompatible("ultralytics.nn.tasks.check_yaml is missing")
    tasks.check_yaml = functools.wraps(tasks.check_yaml)(
        functools.partial(check_yaml_with_plugin_configs, tasks.check_yaml)
    )
    _guard_ncnn_export()
    int8_export.register(importlib.import_module("ultralytics.engine.exporter").Exporter)
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
