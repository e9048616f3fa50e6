"""What fnexport knows about TensorRT plans without importing TensorRT (it is handed the module or objects).

The process's logger (errors kept for messages), the timing cache file kept between builds, the layer
precisions IEngineInspector reports, and which TensorRT versions and GPUs a plan certainly cannot load on.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from fnexport.console import log
from fnexport.data import cache_dir

_LOGGER: Any = None  # see trt_logger


def trt_logger(trt: ModuleType) -> Any:
    """The process's one TensorRT logger: it keeps errors for our messages and forwards warnings to our log.

    One for the whole process, as Polygraphy keeps one: TensorRT logs everything made through a builder or
    runtime to the logger that made it, which must outlive them all (NvInferRuntime.h, ILogger). Errors are
    cleared on each call, so a message quotes only what TensorRT said since.
    """
    global _LOGGER
    if _LOGGER is None:

        class Capture(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:  # called from C++: must not raise
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                    self.errors.append(msg)
                elif severity == trt.Logger.WARNING:
                    log.warning("TensorRT: %s", msg)

        _LOGGER = Capture()
    _LOGGER.errors.clear()
    return _LOGGER


def trt_errors(logger: Any) -> str:
    return "; ".join(logger.errors) or "TensorRT logged no error"


def default_timing_cache(trt_version: str, here: dict[str, str]) -> Path:
    """fnexport's timing cache for this TensorRT version and GPU: a cache from another GPU, even of the same
    compute capability, makes TensorRT refuse it (set_timing_cache returns False), so name and UUID are in the key."""
    gpu = re.sub(r"[^a-z0-9]+", "-", here["gpu"].lower()).strip("-")
    uuid = here.get("gpu_uuid", "").removeprefix("GPU-")[:8] or "nouuid"
    cc = here["compute_capability"].replace(".", "")
    return cache_dir() / "tensorrt" / f"timing-trt{trt_version}-sm{cc}-{gpu}-{uuid}.cache"


def load_timing_cache(config: Any, path: Path) -> str:
    """Give `config` the timing cache in `path`, or a fresh one; returns "reused", "fresh" or "none".

    TensorRT returns None for a blob it cannot read and False when the cache's device, driver or version
    differs from this machine's; Polygraphy and trtexec both fall back, and so do we, saying so.
    """
    try:
        blob = path.read_bytes() if path.is_file() else b""
    except OSError as err:
        log.warning("Timing cache %s is unreadable (%s); starting a fresh one", path, err)
        blob = b""
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is None:
            log.warning("TensorRT cannot read the timing cache %s (corrupt or another version); starting fresh", path)
        elif config.set_timing_cache(cache, ignore_mismatch=False):
            return "reused"
        else:
            log.warning("Timing cache %s comes from another GPU, driver or TensorRT; starting a fresh one", path)
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return "fresh"
    log.warning("TensorRT took no timing cache; building without one")
    return "none"


def save_timing_cache(config: Any, path: Path) -> bool:
    """Write the builder's timing cache to `path` atomically; a failure is a warning, never a lost engine."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("TensorRT has no timing cache to save; %s left as it was", path)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(cache.serialize())
        os.replace(tmp, path)
    except Exception as err:  # anything TensorRT or the disk raises here must not cost the engine just built
        log.warning("Could not save the timing cache %s (%s); the engine is kept", path, err)
        tmp.unlink(missing_ok=True)
        return False
    return True


# The inspector's tensor format strings name the type inside longer text ("Row major linear FP32",
# "Channel major FP16 format where channel % 8 == 0", Myelin's "Half"); first match wins, so BF16 before FLOAT.
PRECISION_WORDS = (
    ("bfloat16", "BF16"),
    ("bf16", "BF16"),
    ("fp8", "FP8"),
    ("fp4", "FP4"),
    ("int4", "INT4"),
    ("int8", "INT8"),
    ("fp16", "FP16"),
    ("half", "FP16"),
    ("fp32", "FP32"),
    ("float", "FP32"),
    ("int32", "INT32"),
    ("int64", "INT64"),
    ("bool", "BOOL"),
)
DATA_MOVEMENT = {"Reformat", "NoOp"}


def precision_of(text: str) -> str | None:
    low = text.lower()
    return next((name for word, name in PRECISION_WORDS if word in low), None)


def layer_precision(layer: dict) -> str | None:
    """A layer's precision as TensorRT's engine explorer reads it: its first input's type, else output, else weights."""
    for side in ("Inputs", "Outputs"):
        for tensor in (layer.get(side) or [])[:1]:
            # 10.x writes "Format/Datatype"; 11.x splits the field (exact 11.x key names unverified: try each).
            for key in ("Format/Datatype", "DataType", "Datatype", "Format"):
                found = precision_of(str(tensor.get(key) or ""))
                if found:
                    return found
    weights = layer.get("Weights") or layer.get("ConvWeights") or {}
    return precision_of(str(weights.get("Type", ""))) if isinstance(weights, dict) else None


def summarize_layers(info: dict) -> dict[str, Any]:
    """Per-layer precisions from IEngineInspector's JSON (10.x "Bindings" or 11.x "I/O Tensors" schema)."""
    rows = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # profiling verbosity LAYER_NAMES_ONLY: names, no types
            rows.append({"name": layer, "type": None, "precision": None})
        else:
            rows.append(
                {
                    "name": str(layer.get("Name", "")),
                    "type": layer.get("LayerType"),
                    "precision": layer_precision(layer),
                }
            )
    compute = [r for r in rows if r["type"] not in DATA_MOVEMENT]
    counts = Counter(r["precision"] or "unknown" for r in compute)
    fp32 = [r["name"] for r in compute if r["precision"] == "FP32"]
    summary = ", ".join(f"{n} {p}" for p, n in counts.most_common())
    moved = len(rows) - len(compute)
    return {
        "available": True,
        "schema": "11.x" if "I/O Tensors" in info else "10.x",
        "counts": dict(counts),
        "fp32_layers": fp32,
        "summary": f"{summary}; {moved} reformat/no-op" + (f"; FP32: {', '.join(fp32[:8])}" if fp32 else ""),
        "layers": rows,
    }


def inspect_layers(
    trt: ModuleType, plan: Any, input_name: str, shapes: tuple | None, version_compatible: bool
) -> dict[str, Any]:
    """Which precision each layer of the built engine runs in, from IEngineInspector when TensorRT offers it."""
    try:
        runtime = trt.Runtime(trt_logger(trt))
        runtime.engine_host_code_allowed = version_compatible
        engine = runtime.deserialize_cuda_engine(plan)
        inspector = engine.create_engine_inspector()
        context = engine.create_execution_context()
        if shapes is not None:  # without input shapes the inspector prints -1 dims and no formats
            context.set_input_shape(input_name, shapes[1])
        inspector.execution_context = context
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        result = summarize_layers(json.loads(text))
        del inspector, context, engine, runtime
    except Exception as err:  # lean runtimes lack the inspector; layer names are a report, never worth the engine
        return {"available": False, "reason": f"IEngineInspector unavailable: {type(err).__name__}: {err}"}
    return result


def version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in str(text).split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


# TensorRT's support matrix (11.4): "Two combinations are supported across major versions: TensorRT 10
# version-compatible engines can run with a TensorRT 11 runtime, and TensorRT 8 version-compatible engines can
# run with a TensorRT 10 runtime. No other combination across major versions is supported."
CROSS_MAJOR = {(8, 10), (10, 11)}


def engine_mismatch(built: dict[str, Any], here: dict[str, str], trt_version: str) -> list[str]:
    """What certainly stops an engine built on `built` from loading here; the rest TensorRT decides on loading."""
    made, have = version_tuple(built["tensorrt"]), version_tuple(trt_version)
    problems = []
    if not built["version_compatible"]:
        if made != have:  # "By default, TensorRT engines are compatible only with the version ... used to build them"
            problems.append(f"TensorRT {built['tensorrt']} built it but this machine has {trt_version}")
    elif have < made:
        problems.append(
            f"TensorRT {built['tensorrt']} built it (version-compatible) but this machine has the older {trt_version}"
        )
    elif made[:1] != have[:1] and (made[0], have[0]) not in CROSS_MAJOR:
        problems.append(
            f"TensorRT {built['tensorrt']} built it (version-compatible) but this machine has {trt_version}: across "
            "major versions TensorRT runs only 8 -> 10 and 10 -> 11"
        )
    cc_built, cc_here = version_tuple(built["compute_capability"]), version_tuple(here["compute_capability"])
    level = built["hardware_compat"]
    if level == "ampere+" and cc_here < (8, 0):
        problems.append(f"built for Ampere and newer (sm 8.0+) but this GPU is sm {here['compute_capability']}")
    elif level != "ampere+" and cc_here != cc_built:
        problems.append(
            f"built for compute capability {built['compute_capability']} ({built['gpu']}) but this GPU is {here['compute_capability']} ({here['gpu']})"
        )
    return problems
