"""INT8 export of PST models: the attention of the PST rows stays in float.

Ultralytics' INT8 exporters quantize the inputs of every MatMul, the attention products included. PST ranks the
eq. 3 scores of those products to pick its top-k coarse tokens, and INT8 reorders the ranking: on the demo's trained
YOLO11n-PST only 0.456 (ONNX Runtime) and 0.781 (OpenVINO) of the tokens fp32 picks were still picked
(docs/QUANTIZATION.md). Each toolchain's own exclusion keeps the PST rows' MatMuls in float, the convolutions around
them INT8:

- ONNX Runtime static quantization (``format=onnx quantize=8``): their nodes join ``nodes_to_exclude`` of
  ``onnxruntime.quantization.quantize_static``;
- NNCF (``format=openvino quantize=8``): their MatMul and ScaledDotProductAttention operations join the
  ``IgnoredScope`` of ``nncf.quantize``.

Both are wrapped only while a PST model's ``Exporter.export_onnx`` / ``export_openvino`` runs with ``quantize=8``;
other models and precisions go through untouched. LiteRT INT8 (``litert_torch``) has no per-op exclusion that
Ultralytics' call reaches, so it quantizes the attention (its k=8 effect is still tested to survive). Set
``KEEP_ATTENTION_FLOAT = False`` to quantize the attention too (to measure what keeping it in float buys).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

from ultralytics.utils import LOGGER

from .nn import PSAttn

KEEP_ATTENTION_FLOAT = True


def pst_rows(model) -> list[int]:
    """Indices of the top-level layers of an Ultralytics model that hold PSA modules (its PST rows)."""
    return [i for i, layer in enumerate(model.model) if any(isinstance(m, PSAttn) for m in layer.modules())]


def onnx_attention_nodes(onnx_file, rows: list[int]) -> list[str]:
    """MatMul nodes of the PST rows in an ONNX graph (the TorchScript exporter scopes them ``/model.{i}/...``)."""
    import onnx

    prefixes = tuple(f"/model.{i}/" for i in rows)
    graph = onnx.load(str(onnx_file)).graph
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.name.startswith(prefixes)]


OPENVINO_ATTENTION = {"MatMul", "ScaledDotProductAttention"}  # the k=0 coarse attention converts to the latter


def openvino_attention_ops(ov_model, rows: list[int]) -> list[str]:
    """Attention operations (MatMul, ScaledDotProductAttention) of the PST rows in an OpenVINO model (friendly
    names ``__module.model.{i}....``)."""
    prefixes = tuple(f"__module.model.{i}." for i in rows)
    ops = [op for op in ov_model.get_ordered_ops() if op.get_type_name() in OPENVINO_ATTENTION]
    return [op.get_friendly_name() for op in ops if op.get_friendly_name().startswith(prefixes)]


def quantize_static_keeping(rows: list[int], stock, model_input, model_output, reader, **kwargs):
    """``onnxruntime.quantization.quantize_static`` with the PST rows' MatMuls added to ``nodes_to_exclude``."""
    kept = onnx_attention_nodes(model_input, rows)
    LOGGER.info(f"pst-yolo: INT8 keeps {len(kept)} attention MatMuls of PST rows {rows} in float")
    kwargs["nodes_to_exclude"] = [*(kwargs.get("nodes_to_exclude") or []), *kept]
    return stock(model_input, model_output, reader, **kwargs)


def nncf_quantize_keeping(rows: list[int], stock, model, *args, **kwargs):
    """``nncf.quantize`` with the PST rows' attention operations added to its ``IgnoredScope``."""
    import nncf

    kept = openvino_attention_ops(model, rows)
    LOGGER.info(f"pst-yolo: INT8 keeps {len(kept)} attention operations of PST rows {rows} in float")
    scope = kwargs.get("ignored_scope") or nncf.IgnoredScope()
    kwargs["ignored_scope"] = nncf.IgnoredScope(
        names=[*scope.names, *kept], patterns=scope.patterns, types=scope.types, subgraphs=scope.subgraphs,
        validate=scope.validate,
    )  # fmt: skip
    return stock(model, *args, **kwargs)


@contextlib.contextmanager
def wrapped(module_name: str, attribute: str, wrapper):
    """Replace ``module.attribute`` by ``partial(wrapper, original)`` inside the block (imported here: the exporter
    imports the quantizer only when it quantizes)."""
    module = importlib.import_module(module_name)
    stock = getattr(module, attribute)
    setattr(module, attribute, functools.wraps(stock)(functools.partial(wrapper, stock)))
    try:
        yield
    finally:
        setattr(module, attribute, stock)


QUANTIZERS = {  # Exporter method -> (module, function) that quantizes for it, and the wrapper keeping attention float
    "export_onnx": ("onnxruntime.quantization", "quantize_static", quantize_static_keeping),
    "export_openvino": ("nncf", "quantize", nncf_quantize_keeping),
}


def export_keeping_attention_float(stock, method: str, exporter, *args, **kwargs):
    """``Exporter.<method>`` that, for a PST model at ``quantize=8``, keeps the PST rows' attention in float."""
    rows = pst_rows(exporter.model) if hasattr(exporter.model, "model") else []
    if not (KEEP_ATTENTION_FLOAT and rows and exporter.args.quantize == 8):
        return stock(exporter, *args, **kwargs)
    module_name, attribute, wrapper = QUANTIZERS[method]
    with wrapped(module_name, attribute, functools.partial(wrapper, rows)):
        return stock(exporter, *args, **kwargs)


def keeping_attention_float(stock, method: str):
    """``Exporter.<method>`` wrapped by :func:`export_keeping_attention_float`."""

    @functools.wraps(stock)
    def export(self, *args, **kwargs):
        return export_keeping_attention_float(stock, method, self, *args, **kwargs)

    export._pst_yolo = True
    return export


def register(exporter_class) -> None:
    """Wrap the INT8-capable export methods of Ultralytics' ``Exporter`` (idempotent)."""
    for method in QUANTIZERS:
        stock = getattr(exporter_class, method)
        if not getattr(stock, "_pst_yolo", False):
            setattr(exporter_class, method, keeping_attention_float(stock, method))
