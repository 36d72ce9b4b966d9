"""Attention backends behind one switch: ``naive``, ``sdpa``, ``flash`` (flash-attn) and ``sage`` (SageAttention).

The default comes from the environment variable ``PST_ATTN_BACKEND`` (read once at import, ``auto`` when unset);
:func:`set_backend` changes it and :func:`use_backend` changes it for a ``with`` block. ``auto`` picks the fastest
usable kernel for the tensors at hand and falls back to SDPA with one log line; naming a backend that cannot run
raises a ``RuntimeError`` that says why. Under ``torch.compile`` ``auto`` means ``sdpa``; while a graph is exported
(:func:`~pst_yolo.ops.export_compat.is_exporting_graph`) every backend runs as plain MatMul + Softmax.

``flash`` and ``sage`` run only on CUDA tensors. The one exception is a seam offered on purpose for tests:
inside :func:`kernels_on_any_device` the device (and GPU generation) checks are skipped, so the adapters below can run
on CPU tensors through test-only stand-ins of the two packages (``tests/standins``). Package code never enters it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys

import torch
import torch.nn.functional as F

from ..validation import check_choice
from . import export_compat
from .export_compat import is_exporting, is_exporting_graph

LOGGER = logging.getLogger("pst_yolo")
BACKENDS = ("auto", "naive", "sdpa", "flash", "sage")
SAGE_HEAD_DIMS = (64, 96, 128)
# sageattention 1.0.6's non-causal kernel (attn_qk_int8_per_block.py, _attn_fwd_inner) loads keys in blocks of 64 and
# does not mask the padding of the last block: with kv_len % 64 != 0 the padded slots join the softmax (measured with
# the real kernel under TRITON_INTERPRET=1: 49 keys give outputs 15% too small). Fixed upstream only in 2.x.
SAGE_KEY_BLOCK = 64

_default_backend = os.environ.get("PST_ATTN_BACKEND", "auto").lower()
_fallbacks_logged: set[str] = set()
_check_kernel_device = True  # False only inside kernels_on_any_device() (tests with stand-in packages)
_seam_capability: tuple[int, int] | None = None  # the GPU generation kernels_on_any_device() pretends
_import_problems: dict[str, str] = {}  # package -> why it did not import (kernel_import_problem)
KERNELS = {"flash": ("flash_attn", "flash_attn_func"), "sage": ("sageattention", "sageattn")}  # package, function


def _check_name(name: object) -> str:
    """A backend name from ``BACKENDS`` (any case), else TypeError/ValueError naming the choices."""
    return check_choice(name, "attention backend", BACKENDS)


def get_backend() -> str:
    """Return the process-wide default backend name."""
    return _check_name(_default_backend)


def set_backend(name: str) -> None:
    """Set the process-wide default backend (one of ``BACKENDS``)."""
    global _default_backend
    _default_backend = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager that sets the default backend for the duration of a ``with`` block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def kernels_on_any_device(capability: tuple[int, int] | None = None):
    """Test seam: inside the block ``flash``/``sage`` skip their CUDA check and take ``capability`` as the GPU's
    compute capability (None: skip the generation checks).

    For tests only, which install contract stand-ins of ``flash_attn``/``sageattention`` that run on CPU tensors
    (the real packages refuse them). Every other check (importable package, dtype, head dim, backward) still applies.
    """
    global _check_kernel_device, _seam_capability
    previous = _check_kernel_device, _seam_capability
    _check_kernel_device, _seam_capability = False, capability
    try:
        yield
    finally:
        _check_kernel_device, _seam_capability = previous


def device_capability(q: torch.Tensor) -> tuple[int, int] | None:
    """(major, minor) compute capability of q's CUDA device; inside :func:`kernels_on_any_device` the capability it
    was given (None: generation checks skipped)."""
    if not _check_kernel_device:
        return _seam_capability
    return torch.cuda.get_device_capability(q.device)


def kernel_import_problem(name: str) -> str | None:
    """Why the kernel function of backend ``name`` cannot be imported (None when it can).

    Installed is not importable: flash-attn's ``__init__`` swallows a missing ``flash_attn_2_cuda`` and then has no
    ``flash_attn_func``; a wheel built for another torch raises ImportError ("undefined symbol") or OSError. A failure
    is remembered for the process (a failed import is not cheap, and attention asks on every forward).
    """
    package, function = KERNELS[name]
    if package not in sys.modules and package in _import_problems:
        return _import_problems[package]
    try:
        module = importlib.import_module(package)
        problem = None if callable(getattr(module, function, None)) else (
            f"package '{package}' imports but has no {function}: its compiled CUDA extension is missing or did not "
            "load; reinstall it for this torch and CUDA"
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001  (ImportError, OSError, RuntimeError from a broken build: all mean unusable)
        problem = f"package '{package}' is installed but cannot be imported ({type(e).__name__}: {e}); reinstall it"
    if problem is not None and package not in sys.modules:
        _import_problems[package] = problem
    return problem


def generation_problem(name: str, capability: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run on a GPU of compute ``capability`` (None when it can).

    flash-attn 2.x's ``mha_fwd`` accepts only sm8x and sm90 (csrc/flash_attn/flash_api.cpp): Turing and older, and
    Blackwell (sm100, sm120), raise. SageAttention 1.0.6's int8 ``tl.dot`` does not compile before sm75; on sm75
    (T4) it needs Triton <= 3.2, and bfloat16 needs sm80.
    """
    sm = f"sm{capability[0]}{capability[1]}"
    if name == "flash" and capability[0] not in (8, 9):
        return f"'flash' (flash-attn 2.x) runs on sm80-sm90 GPUs (Ampere, Ada, Hopper), this one is {sm}"
    if name == "sage":
        if capability < (7, 5):
            return f"'sage' (sageattention 1.0.6) needs an sm75 or newer GPU, this one is {sm}"
        if dtype == torch.bfloat16 and capability < (8, 0):
            return f"'sage' needs an sm80 or newer GPU for bfloat16 inputs, this one is {sm} (use float16)"
        if capability < (8, 0) and not _triton_at_most(3, 2):
            return f"'sage' (sageattention 1.0.6) on {sm} needs triton <= 3.2 (its int8 dot does not compile on newer)"
    return None


def _triton_at_most(major: int, minor: int) -> bool:
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = [int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit()]
    return tuple(parts) <= (major, minor)


def unusable_reason(name: str, q: torch.Tensor, needs_grad: bool, kv_len: int | None = None) -> str | None:
    """Say why backend ``name`` cannot run attention on ``q`` (None when it can).

    Args:
        name: A concrete backend name.
        q: (B, h, N, d) queries (device, GPU generation, dtype and head dim are checked).
        needs_grad: Whether a backward pass will run through the attention.
        kv_len: Number of keys M when known (``sage`` needs a multiple of ``SAGE_KEY_BLOCK``).
    """
    if name in ("naive", "sdpa"):
        return None
    package = KERNELS[name][0]
    if importlib.util.find_spec(package) is None:
        return f"package '{package}' is not installed (pip install 'pst-yolo[{name}]')"
    if _check_kernel_device and q.device.type != "cuda":
        return f"'{name}' needs a CUDA tensor, got device '{q.device.type}'"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"'{name}' needs float16/bfloat16 inputs, got {q.dtype} (use AMP or .half())"
    problem = kernel_import_problem(name)
    if problem is not None:
        return problem
    capability = device_capability(q)
    problem = None if capability is None else generation_problem(name, capability, q.dtype)
    if problem is not None:
        return problem
    if name == "flash" and q.shape[-1] > 256:
        return f"'flash' supports head_dim up to 256, got {q.shape[-1]}"
    if name == "sage" and needs_grad:
        return "'sage' has no backward pass (inference only)"
    if name == "sage" and q.shape[-1] > SAGE_HEAD_DIMS[-1]:
        return f"'sage' supports head_dim up to {SAGE_HEAD_DIMS[-1]}, got {q.shape[-1]}"
    if name == "sage" and kv_len is not None and kv_len % SAGE_KEY_BLOCK:
        return (
            f"'sage' (sageattention 1.0.6) gives wrong results unless the number of keys is a multiple of "
            f"{SAGE_KEY_BLOCK} (got {kv_len}): its kernel does not mask the padding of the last key block"
        )
    return None


def resolve_backend(name: str | None, q: torch.Tensor, kv_len: int | None = None) -> str:
    """Turn ``name`` (or the default when None) into a concrete backend usable for ``q``.

    Args:
        name: A name from ``BACKENDS`` or None for the process default.
        q: The query tensor the attention will run on (its device/dtype decide what is usable).
        kv_len: Number of keys when known (see :func:`unusable_reason`).

    Returns:
        One of ``naive``, ``sdpa``, ``flash``, ``sage``.
    """
    name = _check_name(name or get_backend())
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    if name == "auto":
        if is_exporting() or (q.device.type != "cuda" and _check_kernel_device):
            return "sdpa"
        for candidate in ("flash", "sage"):
            reason = unusable_reason(candidate, q, needs_grad, kv_len)
            if reason is None:
                return candidate
            if candidate not in _fallbacks_logged:
                _fallbacks_logged.add(candidate)
                LOGGER.info(f"pst_yolo: attention backend '{candidate}' not used: {reason}; falling back to SDPA.")
        return "sdpa"
    reason = unusable_reason(name, q, needs_grad, kv_len)
    if reason is not None:
        raise RuntimeError(f"Attention backend '{name}' is not usable: {reason}.")
    return name


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Explicit ``softmax(q k^T / sqrt(d) + bias) v``; q (B, h, N, d), k/v (B, h, M, d) -> (B, h, N, d)."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, N, M)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1) @ v


def _flash_attention(q, k, v, return_lse: bool):
    flash_attn = importlib.import_module("flash_attn")
    out = flash_attn.flash_attn_func(
        q.transpose(1, 2).contiguous(),  # (B, N, h, d) layout
        k.transpose(1, 2).contiguous(),
        v.transpose(1, 2).contiguous(),
        softmax_scale=q.shape[-1] ** -0.5,
        causal=False,
        return_attn_probs=return_lse,
    )
    if return_lse:
        out, lse = out[0], out[1]  # lse: (B, h, N) fp32
        return out.transpose(1, 2), lse
    return out.transpose(1, 2), None


def _sage_attention(q, k, v):
    sageattention = importlib.import_module("sageattention")
    d = q.shape[-1]
    padded = next((p for p in SAGE_HEAD_DIMS if p >= d), None)
    if padded is None:
        raise RuntimeError(f"'sage' supports head_dim up to {SAGE_HEAD_DIMS[-1]}, got {d}.")
    q, k, v = (F.pad(t, (0, padded - d)).contiguous() for t in (q, k, v))  # zero-pad: logits and outputs unchanged
    out = sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=d**-0.5)
    return out[..., :d]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, return_lse: bool = False):
    """Dense attention ``softmax(q k^T / sqrt(d)) v`` on a concrete backend.

    Args:
        q: (B, h, N, d) queries.
        k: (B, h, M, d) keys.
        v: (B, h, M, d) values.
        backend: ``naive``, ``sdpa``, ``flash`` or ``sage`` (see :func:`resolve_backend`).
        return_lse: Also return the per-row log-sum-exp of the scaled logits, (B, h, N) fp32, where the kernel
            gives it for free (``flash``); otherwise the second item is None.

    Returns:
        (out, lse): out (B, h, N, d) in q's dtype, lse as above or None.
    """
    if backend == "naive" or is_exporting_graph():
        blocks = export_compat.traced_query_blocks(q, k.shape[2])
        out = naive_attention(q, k, v) if len(blocks) == 1 else torch.cat([naive_attention(b, k, v) for b in blocks], 2)
        return out, None
    if backend == "flash":
        return _flash_attention(q, k, v, return_lse)
    if backend == "sage":
        return _sage_attention(q, k, v), None
    if backend != "sdpa":
        check_choice(backend, "backend", BACKENDS[1:], "attention")  # raises: a typo must not silently mean SDPA
    return F.scaled_dot_product_attention(*(last_dim_contiguous(t) for t in (q, k, v))), None


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has stride 1, else a contiguous copy.

    The fused CPU/CUDA SDPA kernels need a contiguous last dimension, else they silently take the math path; any
    other layout of the leading dimensions they read through strides.
    """
    return t if t.stride(-1) == 1 else t.contiguous()
