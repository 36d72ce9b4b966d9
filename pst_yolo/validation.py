"""Argument checks shared by the op, the modules, the YAML parser hook and the tools (torch only, no Ultralytics).

Every check returns the value it accepts (normalised: an ``int``, a ``float``, a ``(H, W)`` tuple ...) or raises
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, value outside the rule) with one message shape:
``"<where>: <name> must be <rule>, got <value> (<type>)."`` so that an error names the function or layer, the argument,
the rule and what was passed. The checks read Python values and tensor metadata (shape, dtype, device) only: they
never touch tensor data, so they cost microseconds and never synchronise a GPU. The one data check,
:func:`check_finite`, runs only in debug mode (``PST_YOLO_CHECK_FINITE=1``).
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

CHECK_FINITE = os.environ.get("PST_YOLO_CHECK_FINITE", "").lower() in ("1", "true", "yes")


def describe(value: object) -> str:
    """``repr`` of a value (shortened) with its type, as error messages show it: ``'eight' (str)``."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(error: type[Exception], where: str, name: str, rule: str, value: object, shown: str = "") -> Exception:
    prefix = f"{where}: " if where else ""
    return error(f"{prefix}{name} must be {rule}, got {shown or describe(value)}.")


def _int_rule(minimum: int | None, maximum: int | None) -> str:
    if maximum is None and minimum in (0, 1):
        return "a non-negative integer" if minimum == 0 else "a positive integer"
    bounds = [f">= {minimum}"] * (minimum is not None) + [f"<= {maximum}"] * (maximum is not None)
    return " ".join(["an integer", " and ".join(bounds)]).strip()


def check_int(value: object, name: str, where: str = "", minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (bool, float and str are refused: ``8.0`` or ``"8"`` is a different value) within the bounds."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise _fail(TypeError, where, name, _int_rule(minimum, maximum), value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, where, name, _int_rule(minimum, maximum), value)
    return int(value)


def check_number(
    value: object,
    name: str,
    where: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    above_minimum: bool = False,
    below_maximum: bool = False,
) -> float:
    """A finite real number (int or float, not bool or str) within the bounds; ``above_minimum``/``below_maximum``
    make the bounds strict."""

    def rule() -> str:  # built only for a message: the checks run on every forward
        bounds = [f"{'>' if above_minimum else '>='} {minimum}"] * (minimum is not None)
        bounds += [f"{'<' if below_maximum else '<='} {maximum}"] * (maximum is not None)
        return " ".join(["a finite number", " and ".join(bounds)]).strip()

    if type(value) not in (float, int) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise _fail(TypeError, where, name, rule(), value)
    number = float(value)
    too_low = minimum is not None and (number <= minimum if above_minimum else number < minimum)
    too_high = maximum is not None and (number >= maximum if below_maximum else number > maximum)
    if too_low or too_high or not math.isfinite(number):
        raise _fail(ValueError, where, name, rule(), value)
    return number


def check_bool(value: object, name: str, where: str = "") -> bool:
    """``True`` or ``False`` (1, "yes", "False" ... are refused: a truthy string would silently mean True)."""
    if not isinstance(value, bool):
        raise _fail(TypeError, where, name, "True or False", value)
    return value


def check_type(value: object, name: str, types: type | tuple[type, ...], rule: str, where: str = ""):
    """``value`` if it is an instance of ``types``, else TypeError naming ``rule`` (e.g. "a backend name or None")."""
    if not isinstance(value, types):
        raise _fail(TypeError, where, name, rule, value)
    return value


def check_choice(value: object, name: str, choices: Sequence[str], where: str = "", allow_none: bool = False):
    """One of ``choices`` (strings, compared lower-case), or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    rule = "one of " + ", ".join(repr(c) for c in choices) + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise _fail(TypeError, where, name, rule, value)
    if value.lower() not in choices:
        raise _fail(ValueError, where, name, rule, value)
    return value.lower()


def check_grid(value: object, name: str, where: str = "") -> tuple[int, int]:
    """A grid size ``(H, W)`` of two positive integers (tuple, list or ``torch.Size``)."""
    rule = "(height, width): two positive integers"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _fail(TypeError, where, name, rule, value)
    h, w = value
    fast = type(h) is int and type(w) is int
    if not fast and any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value):
        raise _fail(TypeError, where, name, rule, value)
    if h < 1 or w < 1:
        raise _fail(ValueError, where, name, rule, value)
    return int(h), int(w)


def check_tensor(
    value: object, name: str, where: str = "", ndim: int | None = None, like: torch.Tensor | None = None
) -> torch.Tensor:
    """A floating-point tensor with ``ndim`` dimensions, on the device and of the dtype of ``like`` when given."""

    def rule() -> str:
        return "a floating-point tensor" + (f" with {ndim} dimensions" if ndim else "")

    if not isinstance(value, torch.Tensor):
        raise _fail(TypeError, where, name, rule(), value)
    if not value.is_floating_point():
        raise _fail(TypeError, where, name, rule(), value, f"a tensor of {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise _fail(ValueError, where, name, rule(), value, f"shape {tuple(value.shape)}")
    if like is not None and (value.dtype != like.dtype or value.device != like.device):
        shown = f"{value.device} {value.dtype}"
        raise _fail(ValueError, where, name, f"on {like.device} as {like.dtype} like the queries", value, shown)
    return value


def check_shape(tensor: torch.Tensor, name: str, expected: Sequence[int | None], layout: str, where: str = "") -> None:
    """Raise ValueError unless ``tensor.shape`` matches ``expected`` (None: any size); ``layout`` names the dims."""
    shape = tensor.shape
    if len(shape) != len(expected) or not all(e is None or s == e for s, e in zip(shape, expected)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be {layout} = {want}, got shape {tuple(shape)}.")


def check_attention_tensors(
    where: str, q: object, k: object, v: object | None = None, k_fine: object = None, v_fine: object = None
) -> None:
    """Check the op's token tensors: q (B, h, N, d); k (B, h, M, d); v (B, h, M, dv); k_fine (B, h, N, d);
    v_fine (B, h, N, dv); all floating point, on one device, in one dtype. None skips v, k_fine and v_fine."""
    check_tensor(q, "q", where, ndim=4)
    B, h, N, d = q.shape
    check_tensor(k, "k", where, ndim=4, like=q)
    check_shape(k, "k", (B, h, None, d), "(B, h, M, d) with q's B, h, d", where)
    if v is not None:
        check_tensor(v, "v", where, ndim=4, like=q)
        check_shape(v, "v", (B, h, k.shape[2], None), "(B, h, M, dv) with k's B, h, M", where)
    if k_fine is not None:
        check_tensor(k_fine, "k_fine", where, ndim=4, like=q)
        check_shape(k_fine, "k_fine", (B, h, N, d), "(B, h, N, d) like q", where)
    if v_fine is not None:
        check_tensor(v_fine, "v_fine", where, ndim=4, like=q)
        check_shape(v_fine, "v_fine", (B, h, N, None if v is None else v.shape[3]), "(B, h, N, dv) with v's dv", where)


def check_score_pass_call(
    where: str, q: object, k: object, v: object = None, lse: object = None, max_chunk_elements: object = None
) -> None:
    """Arguments of the eq. 2-3 passes: token tensors as in :func:`check_attention_tensors`, lse (B, h, N) or None,
    max_chunk_elements a positive integer or None."""
    check_attention_tensors(where, q, k, v)
    if lse is not None:
        check_tensor(lse, "lse", where, ndim=3)
        check_shape(lse, "lse", q.shape[:3], "(B, h, N) like q", where)
    if max_chunk_elements is not None:
        check_int(max_chunk_elements, "max_chunk_elements", where, minimum=1)


def check_pyramid_attention_call(
    where: str,
    q: object,
    k: object,
    v: object,
    k_fine: object,
    v_fine: object,
    grids: tuple[object, object] | None,
    topk: object,
    threshold: object,
    fine_projection: object = None,
) -> None:
    """Arguments of ``pyramid_sparse_attention``; grids is ``(fine_hw, coarse_hw)``, or None while exporting, which
    checks only the Python arguments (topk, threshold).

    k_fine and v_fine may be None only when topk is 0 or a ``fine_projection`` (checked by
    :func:`check_fine_projection`) replaces them. In debug mode (``PST_YOLO_CHECK_FINITE=1``) q, k, v, k_fine and
    v_fine must also be finite.
    """
    topk = check_int(topk, "topk", where, minimum=0)
    check_number(threshold, "threshold", where, minimum=0, maximum=1)
    if grids is None:
        return
    check_grid(grids[0], "fine_hw", where)
    check_grid(grids[1], "coarse_hw", where)
    if topk and fine_projection is not None:
        check_fine_projection(where, fine_projection, q)
    elif topk and (k_fine is None or v_fine is None):
        raise ValueError(
            f"{where}: k_fine and v_fine are needed when topk > 0 (got topk={topk}); pass topk=0 for coarse only."
        )
    check_attention_tensors(where, q, k, v, k_fine if topk else None, v_fine if topk else None)
    if CHECK_FINITE:
        for name, t in (("q", q), ("k", k), ("v", v), ("k_fine", k_fine), ("v_fine", v_fine)):
            if t is not None:
                check_finite(t, name, where)


def check_fine_projection(where: str, projection: object, q: torch.Tensor) -> None:
    """A ``FineProjection`` for queries q (B, h, N, d): features (B, C, N), weight (2, h, d, C), scale and shift
    (2, h, d) or None; floating point, on q's device (dtypes may differ from q's under autocast)."""
    fields = ("features", "weight", "scale", "shift")
    if not all(hasattr(projection, name) for name in fields):
        rule = "a FineProjection (features, weight, scale, shift)"
        raise _fail(TypeError, where, "fine_projection", rule, projection)
    check_tensor(q, "q", where, ndim=4)
    B, h, N, d = q.shape
    features = check_tensor(projection.features, "fine_projection.features", where, ndim=3)
    check_shape(features, "fine_projection.features", (B, None, N), "(B, C, N) with q's B, N", where)
    expected = {"weight": (2, h, d, features.shape[1]), "scale": (2, h, d), "shift": (2, h, d)}
    layouts = {"weight": "(2, h, d, C) with q's h, d and the features' C", "scale": "(2, h, d)", "shift": "(2, h, d)"}
    for name in fields[1:]:
        t = getattr(projection, name)
        if t is None and name != "weight":
            continue
        check_tensor(t, f"fine_projection.{name}", where, ndim=len(expected[name]))
        check_shape(t, f"fine_projection.{name}", expected[name], layouts[name], where)
    for name in fields:
        t = getattr(projection, name)
        if t is not None and t.device != q.device:
            rule = f"on {q.device} like the queries"
            raise _fail(ValueError, where, f"fine_projection.{name}", rule, t, str(t.device))


def check_finite(tensor: torch.Tensor, name: str, where: str = "") -> None:
    """Raise ValueError if ``tensor`` holds NaN or infinity (reads the data: a GPU sync; debug mode only)."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} holds {bad} non-finite value(s) (NaN or infinity); PST_YOLO_CHECK_FINITE=1.")


def check_file(value: object, name: str, where: str = "", suffixes: Sequence[str] = ()) -> Path:
    """An existing file (or folder, when ``suffixes`` is empty and it exists), whose suffix is one of ``suffixes``."""
    if not isinstance(value, (str, Path)):
        raise _fail(TypeError, where, name, "a file path", value)
    path = Path(value)
    prefix = f"{where}: " if where else ""
    if not path.exists():
        raise FileNotFoundError(f"{prefix}{name} {str(path)!r} does not exist.")
    if suffixes and (not path.is_file() or path.suffix.lower() not in suffixes):
        kind = "a folder" if path.is_dir() else f"a {path.suffix or 'suffix-less'} file"
        raise ValueError(f"{prefix}{name} {str(path)!r} is {kind}; expected a {'/'.join(suffixes)} file.")
    return path


def check_output_file(value: object, name: str, where: str = "") -> Path:
    """A file path that can be written: not a folder, in a folder that exists (checked before any long run)."""
    if not isinstance(value, (str, Path)):
        raise _fail(TypeError, where, name, "a file path", value)
    path, prefix = Path(value), f"{where}: " if where else ""
    if path.is_dir():
        raise ValueError(f"{prefix}{name} {str(path)!r} is a folder; give a file path.")
    if not path.parent.is_dir():
        raise ValueError(f"{prefix}{name} {str(path)!r}: its folder {str(path.parent)!r} does not exist.")
    return path


def argparse_type(check: Callable, name: str, parse: Callable = int, **rule) -> Callable[[str], object]:
    """An argparse ``type=`` that parses a string with ``parse`` and applies ``check(value, name, **rule)``.

    argparse then prints ``argument --NAME: NAME must be ..., got ...`` and exits with status 2.
    """

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(parse, parse.__name__)
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}.") from None
        try:
            return check(value, name, **rule)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert
