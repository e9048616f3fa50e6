"""TensorRT's rules for an ONNX graph, checked without TensorRT: the parser's operators and INT8 Q/DQ placement.

The INT8 placement is NVIDIA Model Optimizer's (ModelOpt 0.47, `modelopt.onnx.quantization`), read from its source
(NVIDIA/Model-Optimizer @a2fbac7): int8.py (the flow), graph_utils.py (build_non_residual_input_map,
find_nodes_from_convs_to_exclude, _exclude_matmuls_by_shape_inference, remove_partial_input_qdq), ort_utils.py
(configure_ort: the ONNX Runtime options) and autocast/convert.py (convert_to_f16: the float part to FP16 with FP32
I/O, opset >= 19). ModelOpt itself pins onnx~=1.21 and installs onnxruntime-gpu beside onnxruntime, so fnexport
applies the same rules through ONNX Runtime's quantizer. On FasterNet-T0 ModelOpt put Q/DQ on 43 of 44 Convs, on
the input of all 13 Splits and on the shortcut of all 13 residual Adds, none on Concat, Gemm, Gelu or ReduceMean,
and made the rest FP16; fnexport's graph has the same placement (tests/targets/test_tensorrt.py).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection
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
# ONNX's QuantizeLinear takes an FP16 input (with an FP16 scale: x and y_scale share one type until opset 23)
# from opset 19; ModelOpt raises the opset to 19 for the same reason (quantize.py, autocast/convert.py).
QDQ_FP16_MIN_OPSET = 19
# Q/DQ scales live in the FP16 part, so they are FP16, as ModelOpt writes them and as TensorRT's strongly typed
# networks want (NvInfer.h, IQuantizeLayer: an FP16 scale must match the input type; onnx-tensorrt gives a
# DequantizeLinear the scale's type as output type, so FP32 scales would make every Conv input FP32). A scale
# below FP16's smallest normal number loses bits, and one that rounds to 0 is refused by TensorRT's parser
# ("Scale coefficients must all be positive"): such scales are raised to it (weights re-rounded to match).
FP16_MIN_NORMAL = 2.0**-14
# ONNX Runtime's options that give ModelOpt's graph (ort_utils.configure_ort): symmetric INT8 (zero point 0,
# set by quantize_int8), per-channel weights on axis 0, float biases, no Q/DQ after any op's output (TensorRT
# fuses Conv + bias + act + residual Add and quantizes where the next weighted op needs it), and one Q/DQ pair
# per tensor shared by all its consumers (so the PConv Split reads the shortcut's quantized tensor).
INT8_OPTIONS = {
    "QuantizeBias": False,
    "DedicatedQDQPair": False,
    "OpTypesToExcludeOutputQuantization": [*WEIGHTED, "Add"],
}
MIN_CHANNELS = 16  # ModelOpt's INT8 Conv and GEMM minimum (find_nodes_from_convs_to_exclude, _MIN_MATMUL_DIM)
# TensorRT fuses an Add into the Conv that produces one of its inputs when the path between them is only these
# (with constant second inputs: bias, layer scale), as ModelOpt's get_fusible_backbone matches them.
FUSIBLE_AFTER_CONV = ("Add", "Mul", "Relu", "BatchNormalization")


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


class _Graph:
    """Producers, consumers and constants of a graph, looking through Q/DQ pairs where asked."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.graph = g
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.inputs = {i.name for i in g.input}
        self.consts = set(self.inits) | {o for n in g.node if n.op_type == "Constant" for o in n.output}

    def dq(self, tensor: str) -> onnx.NodeProto | None:
        """The DequantizeLinear producing `tensor`, if any."""
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    def fake_quantized(self, tensor: str) -> bool:
        """Whether `tensor` is an activation passed through QuantizeLinear -> DequantizeLinear."""
        dq = self.dq(tensor)
        q = self.producer.get(dq.input[0]) if dq is not None else None
        return q is not None and q.op_type == "QuantizeLinear"

    def source(self, tensor: str) -> str:
        """The float tensor behind a fake-quantized `tensor` (itself otherwise)."""
        return self.producer[self.dq(tensor).input[0]].input[0] if self.fake_quantized(tensor) else tensor

    def depends_on(self, tensor: str, ancestor: str) -> bool:
        """Whether computing `tensor` reads `ancestor` (through any path, Q/DQ included)."""
        seen, todo = set(), [tensor]
        while todo:
            t = todo.pop()
            if t == ancestor:
                return True
            if t in seen or t not in self.producer:
                continue
            seen.add(t)
            todo.extend(i for i in self.producer[t].input if i and i not in self.consts)
        return False

    def reads_graph_input(self, tensor: str) -> bool:
        """Whether `tensor` is a graph input, behind Q/DQ and the FP16 part's input Cast."""
        t = self.source(tensor)
        n = self.producer.get(t)
        return (n.input[0] if n is not None and n.op_type == "Cast" else t) in self.inputs

    def conv_behind(self, tensor: str) -> onnx.NodeProto | None:
        """The Conv whose output reaches `tensor` through ops TensorRT fuses into it, if any."""
        t = self.source(tensor)
        while (n := self.producer.get(t)) is not None:
            if n.op_type == "Conv":
                return n
            computed = [i for i in n.input if i and i not in self.consts]
            if n.op_type not in FUSIBLE_AFTER_CONV or len(computed) != 1:
                return None
            t = self.source(computed[0])
        return None

    def weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A Conv/Gemm weight as an array (the INT8 one behind a DequantizeLinear), None if not constant."""
        w = node.input[1]
        dq = self.dq(w)
        return self.inits.get(dq.input[0] if dq is not None else w)


def residual_adds(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Residual Adds by name, with (shortcut, branch) input indices.

    As ModelOpt's build_non_residual_input_map: an Add of two computed tensors, one computed from the other (the
    shortcut, at the lowest common ancestor), the other from a Conv (the branch, which TensorRT fuses the Add into).
    """
    g = _Graph(model)
    found = {}
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or g.consts.intersection(n.input):
            continue
        for shortcut, branch in ((0, 1), (1, 0)):
            source = g.source(n.input[shortcut])
            if g.conv_behind(n.input[branch]) is not None and g.depends_on(n.input[branch], source):
                found[n.name] = (shortcut, branch)
                break
    return found


def conv_float_reason(node: onnx.NodeProto, weight_shape: tuple[int, ...], takes_graph_input: bool) -> str | None:
    """Why ModelOpt leaves this Conv in float for INT8 (find_nodes_from_convs_to_exclude), or None to quantize it.

    Fewer than 16 input or output channels has no fast INT8 kernel, except a plain square conv with a multiple
    of 8 on one side and 16+ on the other (or reading the graph input), or a grouped conv with a multiple of 8
    outputs and kernels of 3+.
    """
    oc, ic = int(weight_shape[0]), int(weight_shape[1])  # ic per group, as ONNX stores it
    if oc >= MIN_CHANNELS and ic >= MIN_CHANNELS:
        return None
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else list(weight_shape[2:])
    if group == 1 and (oc % 8 == 0 or ic % 8 == 0) and len(set(kernel)) == 1:
        if takes_graph_input or max(oc, ic) >= MIN_CHANNELS:
            return None
    if group > 1 and oc % 8 == 0 and all(k >= 3 for k in kernel):
        return None
    return f"{ic}->{oc} channels: under {MIN_CHANNELS} and not a multiple of 8, no fast INT8 kernel (stays FP16)"


def gemm_float_reason(m: int, k: int, n: int) -> str | None:
    """Why ModelOpt leaves this Gemm in float (_exclude_matmuls_by_shape_inference), or None to quantize it.

    m is the batch, taken as 1 when dynamic as ModelOpt does: a GEMV cannot use Tensor Cores, and Q/DQ on a
    GEMM with K or N under 16 makes TensorRT slower.
    """
    if m == 1 or n == 1:
        return f"GEMV ({m}x{k} by {k}x{n}; a dynamic batch counts as 1): no Tensor Core INT8 gain (stays FP16)"
    if k < MIN_CHANNELS or n < MIN_CHANNELS:
        return f"K={k} or N={n} under {MIN_CHANNELS}: Q/DQ would slow TensorRT down (stays FP16)"
    return None


def float_weighted(model: onnx.ModelProto) -> dict[str, str]:
    """Conv/Gemm nodes that stay in float under ModelOpt's rules, with why."""
    import onnx

    g = _Graph(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]  # dynamic (dim_param) counts as 1
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    reasons: dict[str, str] = {}
    for n in model.graph.node:
        w = g.weight(n) if n.op_type in WEIGHTED else None
        if n.op_type == "Conv":
            reason = "weight is not constant" if w is None else None
            reason = reason or conv_float_reason(n, w.shape, g.reads_graph_input(n.input[0]))
        elif n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            out = dims.get(n.output[0], [1, 1])
            reason = (
                "weight is not constant"
                if w is None
                else gemm_float_reason(out[0], w.shape[-1 if trans_b else 0], out[-1])
            )
        else:
            continue
        if reason:
            reasons[n.name] = reason
    return reasons


def place_qdq(model: onnx.ModelProto) -> int:
    """Take Q/DQ off each residual Add's branch input (TensorRT fuses the Add into the branch's Conv, which
    then must see a float tensor: ModelOpt's remove_partial_input_qdq); returns how many inputs were restored.

    ONNX Runtime quantizes both inputs of a quantized Add.
    """
    g, residual = _Graph(model), residual_adds(model)
    restored = 0
    for n in model.graph.node:
        k = residual.get(n.name, (0, None))[1]
        if k is not None and g.fake_quantized(n.input[k]):
            n.input[k] = g.source(n.input[k])
            restored += 1
    _float_graph_outputs(model, g)
    _drop_dead_nodes(model.graph)
    return restored


def _float_graph_outputs(model: onnx.ModelProto, g: _Graph) -> None:
    """Give graph outputs their float values back.

    ONNX Runtime quantizes a graph output that a quantized node also reads (a backbone's stage output feeding
    the next merging conv) by renaming its producer's output and giving the DequantizeLinear the output's name,
    so the caller would get the INT8-rounded tensor. The DequantizeLinear gets a name of its own and an Identity
    of the float tensor becomes the output; read by no node, it also lets the FP16 converter cast it to FP32.
    """
    from onnx import helper

    for out in sorted(o.name for o in model.graph.output):
        if not g.fake_quantized(out):
            continue
        dq, src = g.dq(out), g.source(out)
        dequantized = f"{out}_DequantizeLinear_Output"
        for n in model.graph.node:
            n.input[:] = [dequantized if i == out else i for i in n.input]
        dq.output[0] = dequantized
        model.graph.node.append(helper.make_node("Identity", [src], [out], name=f"{out}_float"))


def fp16_safe_scales(model: onnx.ModelProto) -> int:
    """Raise Q/DQ scales under FP16's smallest normal to it, re-rounding INT8 weights to the new scale.

    Returns how many scale values were raised (a near-zero weight channel or activation).
    """
    from onnx import numpy_helper

    g = _Graph(model)
    by_name = {i.name: i for i in model.graph.initializer}
    raised = 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[1] not in g.inits:
            continue
        scale = g.inits[n.input[1]].astype(np.float32)
        small = scale < FP16_MIN_NORMAL
        if not small.any():
            continue
        new = np.where(small, np.float32(FP16_MIN_NORMAL), scale).astype(np.float32)
        q = g.inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is not None and q.dtype == np.int8:  # a weight: same values, coarser steps
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1) if scale.size > 1 else None
            shape = [1] * q.ndim
            if axis is not None:
                shape[axis] = -1
            ratio = (scale / new).reshape(shape) if axis is not None else scale / new
            requant = np.clip(np.round(q.astype(np.float32) * ratio), -127, 127).astype(np.int8)
            by_name[n.input[0]].CopyFrom(numpy_helper.from_array(requant, n.input[0]))
            g.inits[n.input[0]] = requant
        by_name[n.input[1]].CopyFrom(numpy_helper.from_array(new.reshape(scale.shape), n.input[1]))
        g.inits[n.input[1]] = new
        raised += int(small.sum())
    return raised


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


def float_part_problems(model: onnx.ModelProto) -> list[str]:
    """Every float tensor must be FP16 except the graph's FP32 inputs and outputs (and the Casts beside them)."""
    import onnx
    from onnx import TensorProto

    g = model.graph
    problems = [
        f"graph {kind} {v.name} is {TensorProto.DataType.Name(v.type.tensor_type.elem_type)}, not FLOAT"
        for kind, vs in (("input", g.input), ("output", g.output))
        for v in vs
        if v.type.tensor_type.elem_type != TensorProto.FLOAT
    ]
    io = {v.name for v in [*g.input, *g.output]}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types |= {i.name: i.data_type for i in g.initializer}
    for name, t in types.items():
        if t in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BFLOAT16) and name not in io:
            problems.append(f"{name} is {TensorProto.DataType.Name(t)} inside the FP16 part")
    for n in g.node:
        if n.op_type == "Cast" and not (io.intersection(n.input) or io.intersection(n.output)):
            problems.append(f"{n.name}: a Cast inside the graph (only the FP32 inputs and outputs are cast)")
    return problems


def verify_qdq(model: onnx.ModelProto, also_float: Collection[str] = ()) -> list[str]:
    """Every way the graph departs from ModelOpt's INT8 placement for TensorRT (empty when it follows it).

    `also_float`: Conv/Gemm node names kept float on request (an INT8 search's fallback), beside ModelOpt's own.
    """
    g = _Graph(model)
    inits = g.inits
    attr = lambda n, key, default: next((a.i for a in n.attribute if a.name == key), default)  # noqa: E731
    problems: list[str] = []
    kept_float = float_weighted(model) | dict.fromkeys(also_float, "kept float on request")
    residual = residual_adds(model)
    # Tensors a Q/DQ pair may feed: a quantized Conv/Gemm's input and a residual Add's shortcut; the shortcut's
    # pair is shared with the tensor's other consumers (the Split), as ModelOpt shares it.
    shortcut_dqs = {n.input[residual[n.name][0]] for n in model.graph.node if n.name in residual}

    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits.get(n.input[2]) if len(n.input) > 2 else None
            if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
                got = "none" if zp is None else f"{zp.dtype} {zp.ravel()[:4]}"
                problems.append(f"{n.name}: zero point must be int8 0 (symmetric INT8), got {got}")
            scale = inits.get(n.input[1])
            if scale is None or not np.all(scale > 0):
                problems.append(f"{n.name}: scale must be a positive constant")
        if n.op_type == "QuantizeLinear" and inits.get(n.input[1], np.zeros(1)).size != 1:
            problems.append(f"{n.name}: activation scale must be per-tensor")
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:  # an activation's pair
            users = g.consumers[n.output[0]]
            allowed = [
                c
                for c in users
                if (c.op_type in WEIGHTED and c.input[0] == n.output[0] and c.name not in kept_float)
                or n.output[0] in shortcut_dqs
            ]
            if len(allowed) != len(users):
                problems.append(
                    f"{n.name}: feeds {sorted({c.op_type for c in users})}; Q/DQ belongs on quantized Conv/Gemm "
                    "inputs and residual shortcuts (shared with the shortcut's other consumers) only"
                )
        if n.op_type not in WEIGHTED:
            continue
        wdq = g.dq(n.input[1])
        if n.name in kept_float:
            if g.fake_quantized(n.input[0]) or wdq is not None:
                problems.append(f"{n.name}: must stay float ({kept_float[n.name]}) but has Q/DQ")
            continue
        if not g.fake_quantized(n.input[0]):
            problems.append(f"{n.name}: {n.op_type} input is not quantized")
        out_axis = 0 if n.op_type == "Conv" or attr(n, "transB", 0) else 1
        if wdq is None or wdq.input[0] not in inits or inits[wdq.input[0]].dtype != np.int8:
            problems.append(f"{n.name}: {n.op_type} weight is not an INT8 initializer behind a DequantizeLinear")
        else:
            w, scale = inits[wdq.input[0]], inits.get(wdq.input[1], np.zeros(0))
            if scale.size != w.shape[out_axis] or attr(wdq, "axis", 1) != out_axis:
                problems.append(f"{n.name}: weight scale must be per output channel (axis {out_axis})")
        if len(n.input) > 2 and n.input[2] and (n.input[2] not in inits or inits[n.input[2]].dtype.kind != "f"):
            problems.append(f"{n.name}: bias must stay a float initializer (TensorRT folds it into the kernel)")
    for n in model.graph.node:
        if n.name not in residual:
            continue
        shortcut, branch = (n.input[k] for k in residual[n.name])
        if not g.fake_quantized(shortcut):
            problems.append(f"{n.name}: residual shortcut {shortcut} is not quantized")
        if g.fake_quantized(branch):
            problems.append(f"{n.name}: branch input {branch} is quantized; TensorRT fuses the Add into its Conv")
    return problems + float_part_problems(model)
