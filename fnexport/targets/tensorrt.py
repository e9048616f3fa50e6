"""TensorRT: a TensorRT-ready ONNX (FP16, or INT8 with explicit Q/DQ) anywhere; the engine where TensorRT and a GPU are.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags, no calibrators), so precision
is decided in the ONNX here and the engine build is a plain parse-and-build on the GPU that will run it.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fnexport import manifest as mf
from fnexport.console import log, require, step
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, FnexportError
from fnexport.parity import compare, labels_for, reference, run, tolerance_for
from fnexport.recipes import Recipe
from fnexport.targets.onnx import OrtRunner, convert_fp16, quantize_int8

if TYPE_CHECKING:
    import onnx

    from fnexport.targets import Exported, Source

PREPARED, ENGINE, REFERENCE = "model.onnx", "model.engine", "reference.npz"

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

# Measured on the digits-trained T0 (64 px, 300 held-out digits + 32 natural images), every activation
# rounded to FP16 with FP32 math (at opset 18, where GELU was exported with Erf; opset 20 has one Gelu op):
# mean abs logit error 2.4e-4 with everything FP16, 2.4e-4 keeping Erf,
# 2.4e-4 keeping ReduceMean, 2.4e-4 keeping Gemm; largest activation 33 (FP16 max 65504). Nothing needs FP32.
FP16_KEEP_FP32: tuple[str, ...] = ()
FP16_MAX = 65504.0

WEIGHTED = ("Conv", "Gemm")
# Q/DQ on Conv/Gemm inputs and on residual Adds; outputs of weighted ops stay float so TensorRT fuses
# conv + bias + act (+ residual add) and quantizes where the next weighted op needs it.
INT8_OPTIONS = {
    "QuantizeBias": False,  # TensorRT wants float biases; it folds them into the INT8 kernel itself
    "DedicatedQDQPair": True,  # TensorRT cannot share one Q/DQ pair between consumers
    "OpTypesToExcludeOutputQuantization": [*WEIGHTED, "Add"],
}

HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
DYNAMIC_PROFILE = (1, 16, 64)  # min/opt/max batch of a --dynamic engine; parity feeds chunks of 32


@dataclass(frozen=True)
class EngineOptions:
    """Builder settings that do not change what the engine computes."""

    workspace_gib: float = 4.0
    opt_level: int = 3  # TensorRT's default; 5 searches longest
    version_compatible: bool = False
    hardware_compat: str = "none"
    timing_cache: Path | None = None  # default: one file per TensorRT version and GPU in fnexport's cache
    profile: tuple[int, int, int] | None = None  # dynamic batch min/opt/max; default DYNAMIC_PROFILE

    def __post_init__(self) -> None:
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise BadInput(f"--hardware-compat {self.hardware_compat!r}: choose {', '.join(HARDWARE_COMPAT)}")
        if not 0 <= self.opt_level <= 5:
            raise BadInput(f"--opt-level {self.opt_level}: TensorRT accepts 0 to 5")
        if self.workspace_gib <= 0:
            raise BadInput("--workspace must be > 0 GiB")
        if self.profile is not None and not (1 <= self.profile[0] <= self.profile[1] <= self.profile[2]):
            raise BadInput(f"--profile {self.profile}: need 1 <= min <= opt <= max")


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


def prepare(src: Source, recipe: Recipe, out: Path) -> dict[str, Any]:
    """Write the TensorRT-ready ONNX for `recipe.precision` to `out`; returns manifest details."""
    import onnx

    fp32 = src.onnx()
    if recipe.precision == "fp32":
        out.write_bytes(fp32.read_bytes())
        details: dict[str, Any] = {}
    elif recipe.precision == "fp16":
        details = convert_fp16(fp32, out, FP16_KEEP_FP32)
    else:
        calib = src.calibration()
        graph = onnx.load(str(fp32))
        residual = {n.name for n in residual_adds(graph)}
        gelu_adds = [n.name for n in graph.graph.node if n.op_type == "Add" and n.name not in residual]
        with step(f"Calibrating INT8 ({recipe.calib_method}, {len(calib.x)} images)"):
            details = quantize_int8(
                fp32,
                out,
                calib.x,
                method=recipe.calib_method,
                op_types=[*WEIGHTED, "Add"],
                extra_options=INT8_OPTIONS,
                nodes_to_exclude=gelu_adds,
            )
        model = onnx.load(str(out))
        place_qdq(model)
        # ORT's pre-processing imports every domain it knows; unused imports only confuse other parsers.
        used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
        keep = [imp for imp in model.opset_import if imp.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        problems = verify_qdq(model)
        if problems:  # our placement, not the user's input: a bug
            raise FnexportError(f"INT8 graph breaks TensorRT's Q/DQ rules: {'; '.join(problems[:5])}")
        onnx.checker.check_model(model)
        onnx.save(model, str(out))
        details |= {
            "calibration_data": calib.source,
            "qdq_ops": int(sum(n.op_type == "QuantizeLinear" for n in model.graph.node)),
        }
    model = onnx.load(str(out))
    problems = unsupported_ops(model)
    if problems:
        raise CheckFailed(
            f"TensorRT's ONNX parser would reject this graph: {', '.join(problems)} (checked against {OPS_SOURCE})"
        )
    details["parser_check"] = {
        "passed": True,
        "source": OPS_SOURCE,
        "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
    }
    return details


def activation_absmax(path: Path, x: np.ndarray) -> float:
    """Largest |value| of any tensor in the FP32 graph on `x`: FP16 overflows past 65504."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    names = [o for n in model.graph.node for o in n.output]
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    size = inp.shape[0] if isinstance(inp.shape[0], int) else 16
    peak = 0.0
    for i in range(0, len(x), size):
        part = x[i : i + size]
        part = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)]) if len(part) < size else part
        peak = max(peak, *(float(np.abs(t).max()) for t in session.run(None, {inp.name: part})))
    return peak


def check_prepared(src: Source, recipe: Recipe, prepared: Path, out_dir: Path) -> dict[str, Any]:
    """Run the prepared ONNX on ONNX Runtime CPU against PyTorch; keep the reference for the GPU host."""
    from fnexport.convert import parity_inputs

    data = parity_inputs(src.ckpt, recipe)
    ref = reference(src.ckpt.model, data.x)
    labels = labels_for(src.ckpt.labels, src.ckpt.config.num_classes, data)
    extra = {} if labels is None else {"labels": labels}
    np.savez(out_dir / REFERENCE, logits=ref, input_sha256=np.array(input_digest(data.x)), **extra)
    runner = OrtRunner(prepared)
    try:
        report = compare(ref, run(runner, data.x), tolerance_for(recipe.precision, recipe.tolerance), labels)
    finally:
        runner.close()
    report.ran = dict(runner.info)
    if recipe.precision == "fp16":
        # ORT's CPU provider has no FP16 Conv on x86: it casts the graph back to FP32 and drops the
        # casts between ops, so this run checks FP16 weights only. Overflow is checked separately.
        report.ran["note"] = "ONNX Runtime CPU runs FP16 graphs in FP32 (weights FP16-rounded)"
        peak = activation_absmax(src.onnx(), data.x)
        report.ran["fp32_activation_absmax"] = peak
        if peak > FP16_MAX / 2:
            report.failures.append(f"an activation reaches {peak:.3g}, within 2x of the FP16 limit {FP16_MAX:g}")
    log.info("Prepared ONNX on ONNX Runtime CPU vs PyTorch: %s", report.summary())
    if not report.passed:
        raise CheckFailed(
            f"tensorrt {recipe.precision} prepared ONNX failed parity on ONNX Runtime: {'; '.join(report.failures)}"
        )
    return {"data": data.source, **report.to_dict()}


def input_digest(x: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


def engine_unavailable() -> str | None:
    """Why no engine can be built here, or None."""
    try:
        trt = require("tensorrt", "tensorrt")
        gpu_facts()
    except BackendUnavailable as err:
        return str(err)
    return None if hasattr(trt, "Builder") else "the installed tensorrt package has no Builder (bindings only)"


def gpu_facts() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU visible"
        raise BackendUnavailable(f"{why}: TensorRT engines are built and run on an NVIDIA GPU")
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def profile_for(shape: list, opts: EngineOptions) -> tuple[int, int, int] | None:
    """Min/opt/max batch for a dynamic input (None for a static one)."""
    if isinstance(shape[0], int):
        return None
    return opts.profile or DYNAMIC_PROFILE


def build_engine(
    onnx_path: Path, engine_path: Path, shape: list, precision: str, opts: EngineOptions
) -> dict[str, Any]:
    """Parse the prepared ONNX into a strongly typed network and build a serialized engine."""
    from fnexport.data import cache_dir

    trt = require("tensorrt", "tensorrt")
    here = gpu_facts()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag for the ONNX's FP16/Q-DQ types to be obeyed; in 11 it is the only mode.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * 2**30))
    config.builder_optimization_level = opts.opt_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[opts.hardware_compat])
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: 10-bit mantissas would make "fp32" a lie
    profile = profile_for(shape, opts)
    if profile is not None:
        inp = network.get_input(0)
        dims = [tuple([b, *shape[1:]]) for b in profile]
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(inp.name, *dims)
        config.add_optimization_profile(trt_profile)
    cache_path = (
        opts.timing_cache or cache_dir() / "tensorrt" / f"timing-{trt.__version__}-sm{here['compute_capability']}.cache"
    )
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    with step(f"Building the TensorRT {trt.__version__} engine on {here['gpu']}"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CheckFailed("TensorRT could not build the engine; its log above says why")
    engine_path.write_bytes(plan)  # the bare plan, so `trtexec --loadEngine` opens it
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(config.get_timing_cache().serialize())
    os.replace(tmp, cache_path)
    return {
        "tensorrt": trt.__version__,
        **here,
        "build_seconds": round(time.perf_counter() - start, 1),
        "profile": profile,
        "timing_cache": str(cache_path),
        **{k: v for k, v in asdict(opts).items() if k not in ("timing_cache", "profile")},
    }


def engine_mismatch(built: dict[str, Any], here: dict[str, str], trt_version: str) -> list[str]:
    """What stops an engine built on `built` from loading on this machine (empty when it can load)."""
    version = lambda v: tuple(int(p) for p in v.split(".")[:3] if p.isdigit())  # noqa: E731
    problems = []
    if built["version_compatible"]:
        if version(trt_version)[0] != version(built["tensorrt"])[0] or version(trt_version) < version(
            built["tensorrt"]
        ):
            problems.append(
                f"TensorRT {built['tensorrt']} built it (version-compatible: same major, same or newer) but this machine has {trt_version}"
            )
    elif trt_version != built["tensorrt"]:
        problems.append(f"TensorRT {built['tensorrt']} built it but this machine has {trt_version}")
    cc_built, cc_here = version(built["compute_capability"]), version(here["compute_capability"])
    level = built["hardware_compat"]
    if level == "ampere+" and cc_here < (8, 0):
        problems.append(f"built for Ampere and newer (sm 8.0+) but this GPU is sm {here['compute_capability']}")
    elif level != "ampere+" and cc_here != cc_built:
        problems.append(
            f"built for compute capability {built['compute_capability']} ({built['gpu']}) but this GPU is {here['compute_capability']} ({here['gpu']})"
        )
    return problems


class TensorRtRunner:
    """A TensorRT engine on the GPU, fed and read through torch CUDA tensors."""

    def __init__(self, engine_path: Path, manifest: dict) -> None:
        import torch

        trt = require("tensorrt", "tensorrt")
        here = gpu_facts()
        built = manifest["details"]["engine"]
        problems = engine_mismatch(built, here, trt.__version__)
        if problems:
            raise BackendUnavailable(
                f"{engine_path} cannot run here: {'; '.join(problems)}. Rebuild it on this machine: fnexport build-engine {engine_path.parent}"
            )
        if here["gpu"] != built["gpu"]:
            log.warning("Engine was tuned on %s; running on %s (same compute capability)", built["gpu"], here["gpu"])
        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if built["version_compatible"]:
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} could not deserialize {engine_path}; see its log above"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        dim0 = self.engine.get_tensor_shape(self.input)[0]
        self.batch = dim0 if dim0 > 0 else None
        self.stream = torch.cuda.Stream()
        self.info = {"runtime": f"tensorrt {trt.__version__}", **here}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        # A stream of our own: TensorRT synchronizes extra when enqueued on the legacy default stream.
        with torch.cuda.stream(self.stream):
            inp = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
            self.context.set_input_shape(self.input, tuple(inp.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input, inp.data_ptr())
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FnexportError("TensorRT execute_async_v3 failed; see its log above")
            result = out.cpu()  # waits for the stream
        return result.numpy()

    def close(self) -> None:
        del self.context, self.engine, self.runtime


def handoff(reason: str, shape: list, opts: EngineOptions) -> str:
    """The one line convert ends with when no engine can be built here; {dir} is the output directory."""
    c, h, w = shape[1:]
    profile = profile_for(shape, opts)
    sizes = (
        ""
        if profile is None
        else " "
        + " ".join(f"--{k}Shapes=input:{b}x{c}x{h}x{w}" for k, b in zip(("min", "opt", "max"), profile, strict=True))
    )
    trtexec = (
        f"trtexec --onnx={{dir}}/{PREPARED} --saveEngine={{dir}}/{ENGINE} --stronglyTyped"
        f" --memPoolSize=workspace:{int(opts.workspace_gib * 1024)}M --builderOptimizationLevel={opts.opt_level}{sizes}"
    )
    return (
        f"prepared TensorRT ONNX ready in {{dir}}/{PREPARED} but no engine was built ({reason}); on the GPU host run "
        f"`fnexport build-engine {{dir}}` (builds, checks parity, updates the manifest) or `{trtexec}`"
    )


class TensorRtTarget:
    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    pconv_form: ClassVar[str] = "split_cat"  # `slicing` exports ScatterND + Shape chains that block fusion and Q/DQ
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnxconverter-common", "tensorrt")

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        from fnexport.targets import Exported

        prepared = out_dir / PREPARED
        with step(f"Preparing the TensorRT {recipe.precision} ONNX"):
            details = prepare(src, recipe, prepared)
        details["prepared_check"] = check_prepared(src, recipe, prepared, out_dir)
        details["prepared"] = {"file": PREPARED, "sha256": mf.sha256_artifact(prepared)}
        batch = "batch" if recipe.dynamic else recipe.batch
        shape = [batch, src.ckpt.config.in_chans, recipe.imgsz, recipe.imgsz]
        opts = EngineOptions()
        reason = engine_unavailable()
        if reason is not None:
            return Exported(prepared, details, unfinished=handoff(reason, shape, opts))
        details["engine"] = build_engine(prepared, out_dir / ENGINE, shape, recipe.precision, opts)
        return Exported(out_dir / ENGINE, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None) -> TensorRtRunner:
        if artifact.suffix != ".engine":
            raise BackendUnavailable(
                f"no TensorRT engine beside {artifact.name} yet (the prepared ONNX was checked on ONNX Runtime at convert "
                "time, see details.prepared_check): run `fnexport build-engine DIR` on the GPU host"
            )
        return TensorRtRunner(artifact, manifest)


def build_engine_dir(folder: Path, opts: EngineOptions) -> dict:
    """Build model.engine in a prepared directory, check it against the stored reference, update the manifest."""
    from fnexport.data import load_images
    from fnexport.targets import DEFAULT_DATA

    manifest = mf.read(folder)
    if manifest.get("target") != "tensorrt":
        raise BadInput(f"{folder}: made for --target {manifest.get('target')}, not tensorrt")
    details = manifest["details"]
    prepared = folder / PREPARED
    if not prepared.is_file() or mf.sha256_artifact(prepared) != details["prepared"]["sha256"]:
        raise CheckFailed(f"{prepared}: missing or changed since convert wrote it; re-run fnexport convert")
    tmp = folder / f".{ENGINE}.tmp{os.getpid()}"
    try:
        info = build_engine(prepared, tmp, manifest["input"]["shape"], manifest["precision"], opts)
        updated = manifest | {
            "artifact": ENGINE,
            "sha256": mf.sha256_artifact(tmp),
            "details": details | {"engine": info},
        }
        recipe = Recipe(**manifest["recipe"])
        data = load_images(recipe.parity_data or DEFAULT_DATA, recipe.pre(), recipe.parity_samples, seed=1)
        stored = np.load(folder / REFERENCE)
        if input_digest(data.x) != str(stored["input_sha256"]):
            raise BadInput(f"{data.source}: the parity images differ from the ones convert used; cannot compare here")
        runner = TensorRtRunner(tmp, updated)
        try:
            with step(f"Checking engine parity on {len(data.x)} images"):
                report = compare(
                    stored["logits"],
                    run(runner, data.x),
                    tolerance_for(recipe.precision, recipe.tolerance),
                    stored["labels"] if "labels" in stored else None,
                )
            report.ran = dict(runner.info)
        finally:
            runner.close()
        log.info("Parity tensorrt %s engine vs PyTorch: %s", recipe.precision, report.summary())
        if not report.passed:
            raise CheckFailed(
                f"tensorrt {recipe.precision} engine parity failed: {'; '.join(report.failures)} (engine not kept)"
            )
        updated["parity"] = manifest["parity"] | {"data": data.source} | report.to_dict()
        updated["parity"].pop("reason", None)
        os.replace(tmp, folder / ENGINE)
    finally:
        tmp.unlink(missing_ok=True)
    staged = folder / f".{mf.MANIFEST}.tmp{os.getpid()}"
    staged.write_text(json.dumps(updated, indent=2) + "\n")
    os.replace(staged, folder / mf.MANIFEST)
    return updated
