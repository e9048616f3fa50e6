"""TensorRT: a TensorRT-ready ONNX (FP16, or INT8 with explicit Q/DQ) anywhere; the engine where TensorRT and a GPU are.

TensorRT 11 builds strongly typed networks only (no FP16/INT8 builder flags, no calibrators), so precision
is decided in the ONNX here and the engine build is a plain parse-and-build on the GPU that will run it.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

import fnexport.manifest as mf
from fnexport.comparison import check, check_features, tolerance_for
from fnexport.console import log, require, step
from fnexport.data import batches
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, FnexportError
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Int8Plan, Source
from fnexport.targets.graph import INPUT_NAME, layer_nodes
from fnexport.targets.onnx import OrtRunner, convert_fp16, quantize_int8
from fnexport.targets.tensorrt_cuda import CudaStream, query_gpu
from fnexport.targets.tensorrt_plan import (
    default_timing_cache,
    engine_mismatch,
    inspect_layers,
    load_timing_cache,
    save_timing_cache,
    trt_errors,
    trt_logger,
    version_tuple,
)
from fnexport.targets.tensorrt_qdq import (
    INT8_OPTIONS,
    OPS_SOURCE,
    WEIGHTED,
    float_weighted,
    fp16_safe_scales,
    place_qdq,
    residual_adds,
    unsupported_ops,
    verify_qdq,
)

PREPARED, ENGINE, REFERENCE = "model.onnx", "model.engine", "reference.npz"

# Measured on the digits-trained T0 (64 px, 300 held-out digits + 32 natural images), every activation
# rounded to FP16 with FP32 math (at opset 18, where GELU was exported with Erf; opset 20 has one Gelu op):
# mean abs logit error 2.4e-4 with everything FP16, 2.4e-4 keeping Erf,
# 2.4e-4 keeping ReduceMean, 2.4e-4 keeping Gemm; largest activation 33 (FP16 max 65504). Nothing needs FP32.
FP16_KEEP_FP32: tuple[str, ...] = ()
FP16_MAX = 65504.0
# ONNX Runtime 1.31's CPU rewrite of DQ -> Conv with a float bias (WeightBiasQuantization) quantizes the bias to
# INT32 at input scale x weight scale computed in the scales' type: with FP16 scales that product goes subnormal
# and bias / product overflows FP16 (65816 on a random-weight T0's stem). There the logits were off by 1.4
# (cosine 0.75, top-1 0%); with that one rewrite off the same file matched the FP32-scale graph to 0.014. The
# digits T0 happened not to trip it. TensorRT keeps biases float, so the CPU check runs without the rewrite.
ORT_FP16_QDQ_BUG = ("WeightBiasQuantization",)

HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HARDWARE = {"ampere+": "ampere+", "same-cc": "sameComputeCapability"}  # --hardwareCompatibilityLevel
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
    # Dynamic height/width: (min, opt, max) per dimension; default from the exported size (Recipe.hw_profile).
    profile_hw: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise BadInput(f"--hardware-compat {self.hardware_compat!r}: choose {', '.join(HARDWARE_COMPAT)}")
        if not 0 <= self.opt_level <= 5:
            raise BadInput(f"--opt-level {self.opt_level}: TensorRT accepts 0 to 5")
        if self.workspace_gib <= 0:
            raise BadInput("--workspace must be > 0 GiB")
        if self.profile is not None and not (1 <= self.profile[0] <= self.profile[1] <= self.profile[2]):
            raise BadInput(f"--profile {self.profile}: need 1 <= min <= opt <= max")


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
        plan = src.int8_plan or int8_plans(recipe, full=False)[0]
        nodes = layer_nodes(fp32)
        exclude = [nodes[m] for m in plan.exclude]
        details = prepare_int8(src, recipe, fp32, out, method=plan.kwargs["method"], exclude=exclude)
        details["float_layers"] = list(plan.exclude)
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


def int8_plans(recipe: Recipe, full: bool) -> list[Int8Plan]:
    """TensorRT's INT8 settings in the order the search tries them (the first is the recipe's own): the
    calibration method only. The placement is ModelOpt's and activations stay symmetric (TensorRT's INT8 has no
    zero-points), so `full` adds nothing here. MinMax first, then percentile (hard T0 at 64: cosine 0.974 ->
    0.991, top-1 84% -> 94%), then entropy (ModelOpt's own default). A pinned method is the only one.
    Float layers (by sensitivity) come after these, on the best of them."""
    methods = [recipe.calib_method] if recipe.calib_method_pinned else ["minmax", "percentile", "entropy"]
    return [Int8Plan((("method", m),), recipe.int8_exclude) for m in methods]


def prepare_int8(
    src: Source, recipe: Recipe, fp32: Path, out: Path, method: str | None = None, exclude: Sequence[str] = ()
) -> dict[str, Any]:
    """INT8 as ModelOpt places it for TensorRT (tensorrt_qdq), the float part FP16 with FP32 inputs and outputs.

    Under strong typing TensorRT runs each layer in the type the ONNX gives it, so an FP32 float part would keep
    every Split, Concat, GELU, Add and ReduceMean in FP32 (ModelOpt's high_precision_dtype="fp16" default).
    `method` overrides the recipe's calibration method and `exclude` (Conv/Gemm node names of `fp32`) keeps more
    layers float: what an INT8 search needs. Check the result with prepared_runner(), not a plain OrtRunner.
    """
    import onnx

    calib = src.calibration()
    method = method or recipe.calib_method
    graph = onnx.load(str(fp32))
    kept_float = float_weighted(graph) | dict.fromkeys(exclude, "kept float on request")
    residual = residual_adds(graph)
    other_adds = [n.name for n in graph.graph.node if n.op_type == "Add" and n.name not in residual]
    with step(f"Calibrating INT8 ({method}, {len(calib.x)} images)"):
        details = quantize_int8(
            fp32,
            out,
            calib.x,
            method=method,
            op_types=[*WEIGHTED, "Add"],
            extra_options=INT8_OPTIONS,
            nodes_to_exclude=[*kept_float, *other_adds],
        )
    model = onnx.load(str(out))
    place_qdq(model)
    raised = fp16_safe_scales(model)
    # ORT's pre-processing imports every domain it knows; unused imports only confuse other parsers.
    used = {n.domain for n in model.graph.node} | {"", "ai.onnx"}
    keep = [imp for imp in model.opset_import if imp.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.save(model, str(out))
    fp16 = convert_fp16(out, out, FP16_KEEP_FP32)
    model = onnx.load(str(out))
    problems = verify_qdq(model, also_float=exclude)
    if problems:  # our placement, not the user's input: a bug
        raise FnexportError(f"INT8 graph breaks TensorRT's Q/DQ rules: {'; '.join(problems[:5])}")
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    return details | {
        "calibration_data": calib.source,
        "placement": "NVIDIA ModelOpt 0.47 ONNX INT8 rules (fnexport/targets/tensorrt_qdq.py)",
        "qdq_ops": ops["QuantizeLinear"],
        "residual_adds": len(residual),
        "kept_float": kept_float,
        "float_part": {**fp16, "qdq_scales": "float16", "scales_raised_to_fp16_min_normal": raised},
    }


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
    for part, _ in batches(x, size, pad=True):
        peak = max(peak, *(float(np.abs(t).max()) for t in session.run(None, {inp.name: part})))
    return peak


def prepared_runner(prepared: Path, precision: str) -> OrtRunner:
    """ONNX Runtime CPU on a prepared ONNX, as far as it can stand in for TensorRT (see ORT_FP16_QDQ_BUG)."""
    return OrtRunner(prepared, disabled_optimizers=ORT_FP16_QDQ_BUG if precision == "int8" else ())


def check_prepared(src: Source, recipe: Recipe, prepared: Path, out_dir: Path) -> dict[str, Any]:
    """Run the prepared ONNX on ONNX Runtime CPU against PyTorch; keep the reference for the GPU host."""
    data, ref, labels = src.parity_inputs(), src.reference(), src.labels()
    cfg = src.ckpt.config
    tol = tolerance_for(recipe.precision, recipe.tolerance, backbone=cfg.features)
    runner = prepared_runner(prepared, recipe.precision)
    disabled = runner.info.get("disabled_optimizers")
    if cfg.features:
        names = [o["name"] for o in cfg.outputs()]
        np.savez(out_dir / REFERENCE, input_sha256=np.array(input_digest(data.x)), **dict(zip(names, ref, strict=True)))
        report = check_features(runner, data.x, ref, tol, names)
    else:
        extra = {} if labels is None else {"labels": labels}
        np.savez(out_dir / REFERENCE, logits=ref, input_sha256=np.array(input_digest(data.x)), **extra)
        report = check(runner, data.x, ref, tol, labels)
    if recipe.precision in ("fp16", "int8"):  # INT8's float part is FP16 too
        # ORT's CPU provider has no FP16 Conv on x86: it casts the graph back to FP32 and drops the
        # casts between ops, so this run checks FP16 weights only. Overflow is checked separately.
        report.ran["note"] = "ONNX Runtime CPU runs FP16 graphs in FP32 (weights FP16-rounded)" + (
            "; INT8 emulated by Q/DQ, its bias rewrite off (ORT 1.31 breaks it with FP16 scales)" if disabled else ""
        )
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
    return hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()


def engine_unavailable() -> str | None:
    """Why no engine can be built here, or None."""
    try:
        trt = require("tensorrt", "tensorrt")
        if not hasattr(trt, "Builder"):
            return "the installed tensorrt package has no Builder (lean or dispatch runtime only)"
        query_gpu()
    except BackendUnavailable as err:
        return str(err)
    return None


def profile_shapes(shape: list, opts: EngineOptions) -> tuple[tuple[int, ...], ...] | None:
    """Min, opt and max input shapes of the optimization profile; None when every dimension is fixed.

    One (min, opt, max) range per dynamic dimension: the batch, and height and width of a --dynamic-hw backbone.
    """
    ranges = {} if isinstance(shape[0], int) else {0: opts.profile or DYNAMIC_PROFILE}
    if isinstance(shape[2], str):
        if opts.profile_hw is None:
            raise FnexportError("a dynamic height/width engine needs its profile_hw; please report this")
        ranges[2], ranges[3] = opts.profile_hw
    if not ranges:
        return None
    return tuple(tuple(ranges[d][k] if d in ranges else int(shape[d]) for d in range(len(shape))) for k in range(3))


def engine_hw(recipe: Recipe) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """The height/width profile of a --dynamic-hw recipe's engine (convert and build-engine alike), else None."""
    return recipe.hw_profile() if recipe.dynamic_hw else None


def hardware_level(trt: ModuleType, opts: EngineOptions, here: dict[str, str]) -> Any:
    """TensorRT's HardwareCompatibilityLevel for --hardware-compat, refusing what this TensorRT or GPU cannot build."""
    level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_COMPAT[opts.hardware_compat], None)
    if level is None:  # SAME_COMPUTE_CAPABILITY arrived in TensorRT 10.9
        raise BackendUnavailable(
            f"--hardware-compat {opts.hardware_compat} needs TensorRT >= 10.9; this is {trt.__version__}: "
            "use --hardware-compat ampere+ or none, or pip install 'tensorrt-cu12>=10.9,<12'"
        )
    if opts.hardware_compat == "ampere+" and version_tuple(here["compute_capability"]) < (8, 0):
        raise BackendUnavailable(
            f"--hardware-compat ampere+ needs an Ampere or newer GPU (sm 8.0+) to build on; this {here['gpu']} "
            f"is sm {here['compute_capability']}"
        )
    return level


def build_engine(
    onnx_path: Path, engine_path: Path, shape: list, precision: str, opts: EngineOptions
) -> dict[str, Any]:
    """Parse the prepared ONNX into a strongly typed network and build a serialized engine."""
    trt = require("tensorrt", "tensorrt")
    here = query_gpu()
    level = hardware_level(trt, opts, here)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag for the ONNX's FP16/Q-DQ types to be obeyed; in 11 it is the only mode (and
    # the flag's value changed from 1 to 0), so the bit is computed from the enum, never hard-coded.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_gib * 2**30))
    config.builder_optimization_level = opts.opt_level
    config.hardware_compatibility_level = level
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: 10-bit mantissas would make "fp32" a lie
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer precisions for the inspector
    inp = network.get_input(0)
    shapes = profile_shapes(shape, opts)
    if shapes is not None:
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(trt_profile)
    cache_path = opts.timing_cache or default_timing_cache(trt.__version__, here)
    cache_state = load_timing_cache(config, cache_path)
    start = time.perf_counter()
    with step(f"Building the TensorRT {trt.__version__} engine on {here['gpu']}"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise CheckFailed(f"TensorRT could not build the engine: {trt_errors(logger)}")
    seconds = time.perf_counter() - start
    engine_path.write_bytes(plan)  # the bare plan, so `trtexec --loadEngine` opens it
    # A user's --timing-cache that TensorRT rejected (another GPU) is theirs: never replace it.
    keep_theirs = opts.timing_cache is not None and cache_state != "reused" and cache_path.is_file()
    saved = False if keep_theirs or cache_state == "none" else save_timing_cache(config, cache_path)
    if keep_theirs:
        log.warning("Timing cache %s was not updated: TensorRT did not accept it here", cache_path)
    layers = inspect_layers(trt, plan, inp.name, shapes, opts.version_compatible)
    log.info("Engine layer precisions: %s", layers.get("summary") or layers.get("reason"))
    return {
        "tensorrt": trt.__version__,
        **here,
        "build_seconds": round(seconds, 1),
        "profile": None if shapes is None else [s[0] for s in shapes],
        "profile_shapes": None if shapes is None else dict(zip(("min", "opt", "max"), shapes, strict=True)),
        "timing_cache": {"path": str(cache_path), "loaded": cache_state, "saved": saved},
        "layer_precisions": layers,
        **{k: v for k, v in asdict(opts).items() if k not in ("timing_cache", "profile")},
    }


class TensorRtRunner:
    """A TensorRT engine on the GPU, fed and read through cuda-bindings device buffers in profile-sized chunks."""

    def __init__(self, engine_path: Path, manifest: dict) -> None:
        trt = require("tensorrt", "tensorrt")
        here = query_gpu()
        built = manifest["details"]["engine"]
        problems = engine_mismatch(built, here, trt.__version__)
        rebuild = f"Rebuild it on this machine: fnexport build-engine {engine_path.parent}"
        if problems:
            raise BackendUnavailable(f"{engine_path} cannot run here: {'; '.join(problems)}. {rebuild}")
        if here["gpu"] != built["gpu"]:
            log.warning("Engine was tuned on %s; running on %s (same compute capability)", built["gpu"], here["gpu"])
        logger = trt_logger(trt)
        self.runtime = trt.Runtime(logger)
        if built["version_compatible"]:
            self.runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:  # TensorRT decides compatibility in the end; its log says why
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} could not load {engine_path}: {trt_errors(logger)}. {rebuild}"
            )
        self.logger = logger
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        found = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # Read back in the manifest's order (a backbone's stride order), whatever order the engine lists them in.
        self.outputs = [o["name"] for o in mf.outputs(manifest)]
        if sorted(found) != sorted(self.outputs):
            raise FnexportError(
                f"{engine_path}: the engine's outputs {found} are not the manifest's {self.outputs}. {rebuild}"
            )
        self.backbone = manifest.get("kind") == "backbone"
        for name in (self.input, *self.outputs):
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:  # the prepared ONNX keeps FP32 I/O
                raise FnexportError(f"{engine_path}: tensor {name} is {self.engine.get_tensor_dtype(name)}, not FP32")
        shape = tuple(self.engine.get_tensor_shape(self.input))
        if min(shape) < 0:  # dynamic: the profile bounds what set_input_shape accepts (outputs read -1 otherwise)
            low, opt, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input, 0))
        else:
            low = opt = high = shape
        self.low, self.high = low, high
        self.batch = None if min(shape) < 0 else shape[0]
        self.cuda = CudaStream()
        self.info = {
            "runtime": f"tensorrt {trt.__version__}",
            **here,
            "profile": {"min": list(low), "opt": list(opt), "max": list(high)},
        }

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """A classifier's logits, or a backbone's feature maps in the manifest's order."""
        x = np.ascontiguousarray(x, np.float32)
        inside = x.ndim == len(self.low) and all(
            lo <= d <= hi for lo, d, hi in zip(self.low[1:], x.shape[1:], self.high[1:], strict=True)
        )
        if not inside:
            size, low, high = ("x".join(map(str, s[1:])) for s in (x.shape, self.low, self.high))
            raise BadInput(
                f"input {size} (CxHxW) is outside the engine's profile, {low} to {high}: resize the images into it, "
                "or convert again with that --imgsz H,W (with --dynamic-hw, a --profile-hw that covers it)"
            )
        # Batches above the profile's max run in chunks of max (parity feeds 32, bench any --batch); a chunk
        # below its min is padded with its last image and the padding's outputs dropped.
        step_, least = self.high[0], self.low[0]
        parts = []
        for start in range(0, len(x), step_):
            part = x[start : start + step_]
            n = len(part)
            if n < least:
                part = np.concatenate([part, np.repeat(part[-1:], least - n, axis=0)])
            parts.append([out[:n] for out in self.run(part)])
        outs = [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]
        return outs if self.backbone else outs[0]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """One execute_async_v3 on a batch inside the profile: every output, in self.outputs' order."""
        self.logger.errors.clear()
        if not self.context.set_input_shape(self.input, x.shape):
            raise FnexportError(
                f"TensorRT refused input shape {x.shape} for {self.input!r} inside its profile "
                f"{self.low} to {self.high}: {trt_errors(self.logger)}"
            )
        outs = []
        for name in self.outputs:  # with every input shape set, the context knows each output's shape
            shape = tuple(self.context.get_tensor_shape(name))
            if min(shape) < 0:
                raise FnexportError(f"TensorRT left output {name!r} unshaped ({shape}) for input {x.shape}")
            outs.append(np.empty(shape, np.float32))
        # One device buffer per tensor name, grown only when a larger batch or size needs it.
        d_in = self.cuda.buffer(self.input, x.nbytes)
        self.cuda.upload(d_in, x)
        self.context.set_tensor_address(self.input, d_in)
        d_outs = [self.cuda.buffer(name, out.nbytes) for name, out in zip(self.outputs, outs, strict=True)]
        for name, ptr in zip(self.outputs, d_outs, strict=True):
            self.context.set_tensor_address(name, ptr)
        if not self.context.execute_async_v3(self.cuda.handle):
            raise FnexportError(f"TensorRT execute_async_v3 failed: {trt_errors(self.logger)}")
        for out, ptr in zip(outs, d_outs, strict=True):
            self.cuda.download(out, ptr)
        return outs

    def close(self) -> None:
        del self.context, self.engine, self.runtime  # TensorRT objects first, then the memory they used
        self.cuda.close()


def trtexec_args(onnx: str, engine: str, shape: list, precision: str, opts: EngineOptions) -> list[str]:
    """trtexec flags (TensorRT 10 and 11 both parse them) that build what build_engine builds."""
    args = [f"--onnx={onnx}", f"--saveEngine={engine}", "--stronglyTyped"]  # a no-op in 11, where it is the default
    if precision == "fp32":
        args.append("--noTF32")  # build_engine clears TF32 the same way; trtexec enables it by default
    args += [
        f"--memPoolSize=workspace:{int(opts.workspace_gib * 1024)}M",
        f"--builderOptimizationLevel={opts.opt_level}",
    ]
    if opts.version_compatible:
        args.append("--versionCompatible")
    if opts.hardware_compat != "none":
        args.append(f"--hardwareCompatibilityLevel={TRTEXEC_HARDWARE[opts.hardware_compat]}")
    shapes = profile_shapes(shape, opts)
    for kind, dims in zip(("min", "opt", "max"), shapes or (), strict=False):
        args.append(f"--{kind}Shapes={INPUT_NAME}:{'x'.join(map(str, dims))}")
    return args


def handoff(reason: str, shape: list, precision: str, opts: EngineOptions) -> str:
    """The one line convert ends with when no engine can be built here; {dir} is the output directory."""
    trtexec = " ".join(["trtexec", *trtexec_args(f"{{dir}}/{PREPARED}", f"{{dir}}/{ENGINE}", shape, precision, opts)])
    return (
        f"prepared TensorRT ONNX ready in {{dir}}/{PREPARED} but no engine was built ({reason}); on the GPU host run "
        f"`fnexport build-engine {{dir}}` (builds, checks parity, updates the manifest) or `{trtexec}`"
    )


class TensorRtTarget:
    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    pconv_form: ClassVar[str] = "split_cat"  # `slicing` exports ScatterND + Shape chains that block fusion and Q/DQ
    packages: ClassVar[dict[str, str]] = {
        "onnxruntime": "core",
        "onnxconverter-common": "core",
        "tensorrt": "tensorrt",
        "cuda-bindings": "tensorrt",
    }

    def int8_plans(self, recipe: Recipe, full: bool) -> list[Int8Plan]:
        return int8_plans(recipe, full)

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        return self.finish(src, self.write_prepared(src, out_dir, recipe), recipe)

    def write_prepared(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        """The prepared ONNX alone: what the INT8 search judges (with candidate_runner) for each candidate, so
        that only the chosen one is checked, handed off or built into an engine (finish)."""
        prepared = out_dir / PREPARED
        with step(f"Preparing the TensorRT {recipe.precision} ONNX"):
            details = prepare(src, recipe, prepared)
        return Exported(prepared, details)

    def float_anyway(self, src: Source) -> set[str]:
        """Module names ModelOpt's rules keep float on their own: the search spends no candidate on them."""
        import onnx

        kept = float_weighted(onnx.load(str(src.onnx())))
        return {module for module, node in layer_nodes(src.onnx()).items() if node in kept}

    def candidate_runner(self, exported: Exported) -> OrtRunner:
        """The INT8 search's judge: runner() refuses a prepared ONNX, which is all a candidate is."""
        return prepared_runner(exported.path, "int8")

    def finish(self, src: Source, exported: Exported, recipe: Recipe) -> Exported:
        """Check the prepared ONNX beside it against PyTorch, then build the engine or hand off to the GPU host."""
        prepared, details, out_dir = exported.path, exported.details, exported.path.parent
        details["prepared_check"] = check_prepared(src, recipe, prepared, out_dir)
        details["prepared"] = {"file": PREPARED, "sha256": mf.sha256_artifact(prepared)}
        batch = "batch" if recipe.dynamic else recipe.batch
        dims = ["height", "width"] if recipe.dynamic_hw else list(recipe.hw)
        shape = [batch, src.ckpt.config.in_chans, *dims]
        opts = EngineOptions(profile_hw=engine_hw(recipe))
        if opts.profile_hw is not None:
            details["profile_hw"] = {"height": list(opts.profile_hw[0]), "width": list(opts.profile_hw[1])}
        reason = engine_unavailable()
        if reason is not None:
            return Exported(prepared, details, unfinished=handoff(reason, shape, recipe.precision, opts))
        details["engine"] = build_engine(prepared, out_dir / ENGINE, shape, recipe.precision, opts)
        return Exported(out_dir / ENGINE, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> TensorRtRunner:
        if artifact.suffix != ".engine":
            raise BackendUnavailable(
                f"no TensorRT engine beside {artifact.name} yet (the prepared ONNX was checked on ONNX Runtime at convert "
                "time, see details.prepared_check): run `fnexport build-engine DIR` on the GPU host"
            )
        return TensorRtRunner(artifact, manifest)
