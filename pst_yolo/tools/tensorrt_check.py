"""Check, without TensorRT, that an ONNX graph uses only operators and attributes TensorRT's ONNX parser accepts.

The rules come from ONNX-TensorRT's operator support matrix for TensorRT 10.0/10.1 (``docs/operators.md`` of
github.com/onnx/onnx-tensorrt at the 10.1 GA release, commit 96e7811): opsets 9 to 20, the operators marked
supported, and the restrictions that matter for exported detectors (TopK ``K`` static and < 3840 with
``sorted=1``; ``axes`` inputs constant; Resize modes). Random operators are parsed by TensorRT (seed ignored) but
are reported here too: an exported detector must be deterministic.

    python -m pst_yolo.tools.tensorrt_check model.onnx   # prints the problems, exit code 1 if any
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..validation import check_file

MIN_OPSET, MAX_OPSET = 9, 20
MAX_TOPK = 3840  # TopK: "K input must be less than 3840"
ONNX_DOMAINS = ("", "ai.onnx")

# Operators marked "Y" in ONNX-TensorRT 10.1 docs/operators.md, minus the random ones (see RANDOM_OPS).
TENSORRT_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
    Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
    Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
RANDOM_OPS = frozenset("RandomNormal RandomNormalLike RandomUniform RandomUniformLike Multinomial Bernoulli".split())
# Operator -> input index that must be a constant ("`axes` must be an initializer", "`K` input must be ...").
CONSTANT_INPUTS = {
    "TopK": 1,
    "Slice": 3,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "CumSum": 1,
    **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean")},
    **{op: 1 for op in ("ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _constants(graph) -> dict:
    """Name -> numpy value of every initializer and Constant-node output of ``graph``."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset_problems(model) -> list[str]:
    problems = []
    for opset in model.opset_import:
        if opset.domain in ONNX_DOMAINS and not MIN_OPSET <= opset.version <= MAX_OPSET:
            problems.append(f"opset {opset.version} is outside TensorRT 10's supported range {MIN_OPSET}-{MAX_OPSET}")
        elif opset.domain not in ONNX_DOMAINS:
            problems.append(f"custom operator domain '{opset.domain}' (TensorRT would need a plugin)")
    return problems


def _node_problems(node, constants: dict) -> list[str]:
    """Problems of one node: unsupported operator, non-constant required inputs, unsupported attributes."""
    where = f"{node.op_type} node '{node.name or node.output[0]}'"
    if node.domain not in ONNX_DOMAINS:
        return [f"{where}: custom domain '{node.domain}'"]
    if node.op_type in RANDOM_OPS:
        return [f"{where}: random operator (inference would not be deterministic)"]
    if node.op_type not in TENSORRT_OPS:
        return [f"{where}: operator not supported by TensorRT 10's ONNX parser"]
    problems = []
    index = CONSTANT_INPUTS.get(node.op_type)
    if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
        problems.append(f"{where}: input {index} ('{node.input[index]}') must be a constant")
    attrs = _attributes(node)
    if node.op_type == "TopK":
        problems += _topk_problems(where, attrs, constants.get(node.input[1]))
    elif node.op_type == "Resize":
        problems += _resize_problems(where, attrs)
    return problems


def _topk_problems(where: str, attrs: dict, k) -> list[str]:
    problems = []
    if attrs.get("sorted", 1) != 1:
        problems.append(f"{where}: sorted must be 1")
    if k is not None and int(k.reshape(-1)[0]) >= MAX_TOPK:
        problems.append(f"{where}: K = {int(k.reshape(-1)[0])} must be < {MAX_TOPK}")
    return problems


def _resize_problems(where: str, attrs: dict) -> list[str]:
    def text(name, default):
        value = attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    problems = []
    if text("mode", "nearest") not in RESIZE_MODES:
        problems.append(f"{where}: mode '{text('mode', 'nearest')}' unsupported")
    if text("coordinate_transformation_mode", "half_pixel") not in RESIZE_COORDINATES:
        problems.append(f"{where}: coordinate_transformation_mode '{text('coordinate_transformation_mode', '')}'")
    if text("nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
        problems.append(f"{where}: nearest_mode '{text('nearest_mode', '')}' unsupported")
    if attrs.get("antialias", 0):
        problems.append(f"{where}: antialiasing is not supported")
    return problems


def check_tensorrt_compatible(onnx_path: str | Path) -> list[str]:
    """List what would stop TensorRT 10 from parsing the ONNX model at ``onnx_path`` (empty list: none found).

    Checks the opset range, operator domains, every node (subgraphs of If/Loop/Scan included) against the operators
    ONNX-TensorRT 10.1 supports, constant ``K``/``axes`` inputs, TopK's ``K < 3840`` and ``sorted=1``, Resize modes,
    and the absence of random operators.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    problems = _opset_problems(model)
    graphs = [(model.graph, {})]  # (graph, constants of the enclosing graphs)
    while graphs:
        graph, outer = graphs.pop()
        constants = {**outer, **_constants(graph)}
        for node in graph.node:
            problems += _node_problems(node, constants)
            graphs += [(a.g, constants) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return problems


def main(argv: list[str] | None = None) -> None:
    """Print the TensorRT problems of each ONNX file given; exit code 1 if any."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        raise SystemExit("usage: python -m pst_yolo.tools.tensorrt_check MODEL.onnx [...]")
    failed = False
    try:
        paths = [check_file(path, "model", "pst_yolo.tools.tensorrt_check", suffixes=(".onnx",)) for path in paths]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    for path in paths:
        problems = check_tensorrt_compatible(path)
        failed |= bool(problems)
        print(f"{path}: {'OK for TensorRT 10' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  - {problem}")
    raise SystemExit(int(failed))


if __name__ == "__main__":
    main()
