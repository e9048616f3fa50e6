"""TensorRT's rules for an ONNX graph, checked without TensorRT: the parser's operators and Q/DQ placement."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

# Operators TensorRT's ONNX parser imports: every "Y" row of onnx-tensorrt docs/operators.md at commit
# 7ecb49a (main, May 2024; the TensorRT 10.0 matrix, opsets 9-20). TensorRT 11 parses up to opset 25
# (its ONNX opset guide); later parsers only add operators, so checking against this list is conservative.
TENSORRT_ONNX_OPS = frozenset(
    "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil "
    "Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div "
    "Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm "
    "GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU "
    "HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization "
    "LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean "
    "MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus "
    "Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal "
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements "
    "ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt "
    "Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor".split()
)
TENSORRT_OPSETS = (9, 20)
OPS_SOURCE = "onnx/onnx-tensorrt docs/operators.md @7ecb49a (TensorRT 10.0 matrix)"

WEIGHTED = ("Conv", "Gemm")
# Q/DQ on Conv/Gemm inputs and on residual Adds; outputs of weighted ops stay float so TensorRT fuses
# conv + bias + act (+ residual add) and quantizes where the next weighted op needs it.
INT8_OPTIONS = {
    "QuantizeBias": False,  # TensorRT wants float biases; it folds them into the INT8 kernel itself
    "DedicatedQDQPair": True,  # TensorRT cannot share one Q/DQ pair between consumers
    "OpTypesToExcludeOutputQuantization": [*WEIGHTED, "Add"],
}


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """What TensorRT's ONNX parser would reject, found without TensorRT: unknown ops and opsets."""
    standard = ("", "ai.onnx")
    ops = Counter(n.op_type if n.domain in standard else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    problems = [f"op {op} ({n}x)" for op, n in sorted(ops.items()) if op not in TENSORRT_ONNX_OPS]
    low, high = TENSORRT_OPSETS
    for imp in model.opset_import:  # other domains may be imported unused (ORT's optimizer adds them)
        if imp.domain in standard and not low <= imp.version <= high:
            problems.append(f"opset {imp.version} (parser range {low}-{high})")
    return problems


def residual_adds(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Adds of two computed tensors (the block shortcuts); Adds with a constant belong to GELU."""
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n for n in model.graph.node if n.op_type == "Add" and not consts.intersection(n.input)]


def place_qdq(model: onnx.ModelProto) -> int:
    """Keep Q/DQ only where TensorRT wants it; returns how many inputs were given back their float tensor.

    ORT quantizes every input of a quantized Add, including one a Conv produced, and a tensor with a
    single quantized consumer shares its pair with all consumers (the PConv Split beside the shortcut).
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    residual = {n.name for n in residual_adds(model)}
    restored = 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear":
                continue  # not a fake-quantized activation (weights are DequantizeLinear of an initializer)
            from_weighted = getattr(producer.get(q.input[0]), "op_type", None) in WEIGHTED
            if not ((node.op_type in WEIGHTED and k == 0) or (node.name in residual and not from_weighted)):
                node.input[k] = q.input[0]
                restored += 1
    _drop_dead_nodes(graph)
    return restored


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {i for n in graph.node for i in n.input}
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(live)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def verify_qdq(model: onnx.ModelProto) -> list[str]:
    """Every way the graph breaks TensorRT's Q/DQ placement rules (empty when it follows them)."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    attr = lambda n, key, default: next((a.i for a in n.attribute if a.name == key), default)  # noqa: E731
    problems: list[str] = []

    def quantized(tensor: str) -> onnx.NodeProto | None:
        dq = producer.get(tensor)
        return dq if dq is not None and dq.op_type == "DequantizeLinear" else None

    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits.get(n.input[2]) if len(n.input) > 2 else None
            if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
                problems.append(f"{n.name}: zero point must be int8 0 (symmetric), got {zp.dtype} {zp.ravel()[:4]}")
        if n.op_type == "QuantizeLinear":
            src = producer.get(n.input[0])
            dq_users = [c for dq in consumers[n.output[0]] for c in consumers[dq.output[0]]]
            if getattr(src, "op_type", None) in WEIGHTED and any(c.op_type not in WEIGHTED for c in dq_users):
                problems.append(f"{n.name}: quantizes the output of {src.op_type} {src.name} for a non-weighted op")
            if inits.get(n.input[1], np.zeros(1)).size != 1:
                problems.append(f"{n.name}: activation scale must be per-tensor")
        if n.op_type in WEIGHTED:
            if quantized(n.input[0]) is None:
                problems.append(f"{n.name}: {n.op_type} input is not quantized")
            wdq = quantized(n.input[1])
            out_axis = 0 if n.op_type == "Conv" or attr(n, "transB", 0) else 1
            if wdq is None or wdq.input[0] not in inits:
                problems.append(f"{n.name}: {n.op_type} weight is not an INT8 initializer behind a DequantizeLinear")
            else:
                w, scale = inits[wdq.input[0]], inits.get(wdq.input[1], np.zeros(0))
                if scale.size != w.shape[out_axis] or attr(wdq, "axis", 1) != out_axis:
                    problems.append(f"{n.name}: weight scale must be per output channel (axis {out_axis})")
            if len(n.input) > 2 and n.input[2] and (n.input[2] not in inits or inits[n.input[2]].dtype != np.float32):
                problems.append(f"{n.name}: bias must stay a float32 initializer")
    residual = residual_adds(model)
    for n in residual:
        for t in n.input:
            src = producer.get(t)
            if quantized(t) is None and getattr(src, "op_type", None) not in WEIGHTED:
                problems.append(f"{n.name}: residual input {t} is not quantized")
    allowed = {id(n) for n in residual} | {id(n) for n in graph.node if n.op_type in WEIGHTED}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and any(id(c) not in allowed for c in consumers[n.output[0]]):
            problems.append(
                f"{n.name}: feeds {[c.op_type for c in consumers[n.output[0]]]}, not Conv/Gemm/residual Add"
            )
    return problems
