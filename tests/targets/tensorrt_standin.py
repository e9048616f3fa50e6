"""Stand-ins for the `tensorrt` module and for `cuda.bindings.runtime`: fnexport's own control flow only.

They record calls and return what TensorRT's and cuda-bindings' Python APIs return in the cases issue 21 is
about (set_timing_cache -> False, create_timing_cache -> None, set_input_shape -> False outside the
profile, profile shapes, 10.x/11.x version strings, deserialize_cuda_engine -> None with a logged error,
(cudaError_t, value) tuples). The "engine" computes a made-up function of its input (one logits tensor, or a
backbone's several feature maps, with a dynamic height/width profile if asked) so that chunking, padding, output
order and shapes can be checked. Nothing here is TensorRT or CUDA: a test passing with these stand-ins is never
evidence that an engine builds, loads, runs or matches PyTorch. No GPU has run fnexport's TensorRT code.
"""

# The stand-ins keep the real APIs' names (cudaMalloc, cudaErrorNoDevice), hence mixedCase.
# ruff: noqa: N802, N815

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types

import numpy as np

MAGIC = b"standin-plan:"  # a plan the stand-in runtime can load; anything else deserializes to None


def module(name: str) -> types.ModuleType:
    """An empty module that importlib.util.find_spec (fnexport doctor) accepts from sys.modules."""
    made = types.ModuleType(name)
    made.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return made


def fake_logits(x: np.ndarray, classes: int) -> np.ndarray:
    """What the stand-in engine computes: per-image channel means, tiled and scaled per class."""
    means = x.reshape(len(x), x.shape[1], -1).mean(axis=2)
    return np.stack([means[:, k % x.shape[1]] * (k + 1) for k in range(classes)], axis=1).astype(np.float32)


def fake_features(x: np.ndarray, features: tuple[tuple[str, int, int], ...]) -> list[np.ndarray]:
    """What the stand-in backbone engine computes per (name, channels, stride): the input's channels average-pooled
    over stride x stride blocks, tiled and scaled per output channel, so each map is (N, channels, H/s, W/s)."""
    n, c, h, w = x.shape
    outs = []
    for _, channels, s in features:
        pooled = x.reshape(n, c, h // s, s, w // s, s).mean(axis=(3, 5))
        outs.append(np.stack([pooled[:, k % c] * (k + 1) for k in range(channels)], axis=1).astype(np.float32))
    return outs


# ---------------------------------------------------------------------------------------------- cuda.bindings
class CudaError(enum.IntEnum):  # the names fnexport reads off cudaError_t
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class FakeProp:
    def __init__(self, name: bytes, cc: tuple[int, int], uuid: bytes) -> None:
        self.name, (self.major, self.minor) = name, cc
        self.uuid = types.SimpleNamespace(bytes=uuid)


def make_cudart(
    devices: int = 1,
    name: bytes = b"NVIDIA A100-SXM4-80GB",
    cc: tuple[int, int] = (8, 0),
    uuid: bytes = bytes(range(16)),
    count_error: CudaError = CudaError.cudaSuccess,
) -> types.ModuleType:
    """A stand-in `cuda.bindings.runtime`: host memory plays device memory, so copies are real memmoves."""
    rt = module("cuda.bindings.runtime")
    rt.calls, rt.memory = [], {}
    rt.cudaStreamNonBlocking = 1
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    ok = CudaError.cudaSuccess

    def record(fn):
        def wrapped(*args):
            rt.calls.append((fn.__name__, args))
            return fn(*args)

        wrapped.__name__ = fn.__name__
        setattr(rt, fn.__name__, wrapped)
        return wrapped

    @record
    def cudaGetDeviceCount():
        return (count_error, None) if count_error else (ok, devices)

    @record
    def cudaGetDeviceProperties(device):
        return ok, FakeProp(name + b"\0" * 8, cc, uuid)

    @record
    def cudaSetDevice(device):
        return (ok,)

    @record
    def cudaStreamCreateWithFlags(flags):
        return ok, 0x5EED

    @record
    def cudaStreamSynchronize(stream):
        return (ok,)

    @record
    def cudaStreamDestroy(stream):
        return (ok,)

    @record
    def cudaMalloc(nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        rt.memory[ctypes.addressof(buf)] = buf
        return ok, ctypes.addressof(buf)

    @record
    def cudaFree(ptr):
        del rt.memory[ptr]
        return (ok,)

    @record
    def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (ok,)

    return rt


def make_cuda_utils() -> types.ModuleType:
    utils = module("cuda.bindings.utils")
    utils.get_cuda_native_handle = int
    return utils


# ------------------------------------------------------------------------------------------------- tensorrt
def make_tensorrt(
    version: str = "10.7.0.23",
    profile: tuple[int, int, int] | None = (1, 16, 64),
    classes: int = 10,
    chw: tuple[int, int, int] = (3, 64, 64),
    cache_readable: bool = True,
    cache_accepted: bool = True,
    fresh_cache_accepted: bool = True,
    refuse_shapes: bool = False,
    load_error: str | None = None,
    inspector_json: dict | None = None,
    features: tuple[tuple[str, int, int], ...] | None = None,
    profile_hw: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
) -> types.ModuleType:
    """A stand-in `tensorrt` module with the behaviour switches the tests need; `trt.calls` records calls.

    `features`: a backbone engine's outputs (name, channels, stride) in the engine's own order, instead of one
    `logits`; `profile_hw`: (min, opt, max) of height and of width, which makes both dynamic (-1) in the engine."""
    trt = module("tensorrt")
    trt.__version__ = version
    trt.calls = []
    major = int(version.split(".")[0])
    minor = int(version.split(".")[1])

    def record(*call):
        trt.calls.append(call)

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class Logger(ILogger):
        pass

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0 if major >= 11 else 1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    levels = {"NONE": "NONE", "AMPERE_PLUS": "AMPERE_PLUS"}
    if (major, minor) >= (10, 9):
        levels["SAME_COMPUTE_CAPABILITY"] = "SAME_COMPUTE_CAPABILITY"
    trt.HardwareCompatibilityLevel = types.SimpleNamespace(**levels)
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT")

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            return b"cache:" + version.encode() + b":" + self.blob

    class Config:
        def __init__(self) -> None:
            self.cache = None
            self.flags = set()

        def set_memory_pool_limit(self, pool, size):
            record("set_memory_pool_limit", pool, size)

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            record("clear_flag", flag)

        def add_optimization_profile(self, prof):
            record("add_optimization_profile", prof.shapes)

        def create_timing_cache(self, blob):
            blob = bytes(blob)
            record("create_timing_cache", blob)
            return TimingCache(blob) if (cache_readable or not blob) else None

        def set_timing_cache(self, cache, ignore_mismatch):
            accepted = cache_accepted if cache.blob else fresh_cache_accepted
            record("set_timing_cache", cache.blob, ignore_mismatch, accepted)
            self.cache = cache if accepted else None
            return accepted

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Network:
        def get_input(self, i):
            return types.SimpleNamespace(name="input")

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger

        def create_network(self, flags):
            record("create_network", flags)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record("build_serialized_network", config.hardware_compatibility_level)
            return MAGIC + json.dumps({"profile": profile}).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path):
            record("parse_from_file", path)
            return True

    class Context:
        def __init__(self, engine) -> None:
            self.engine, self.shape, self.addresses = engine, None, {}

        def set_input_shape(self, name, shape):
            shape = tuple(int(d) for d in shape)
            low, high = self.engine.low, self.engine.high
            fits = len(shape) == 4 and all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True))
            ok = fits and not refuse_shapes
            record("set_input_shape", shape, ok)
            if not ok:  # the real call logs an error and returns False; outputs then read -1
                self.engine.logger.log(ILogger.ERROR, f"stand-in: shape {shape} outside [{low}, {high}]")
                self.shape = None
            else:
                self.shape = shape
            return ok

        def get_tensor_shape(self, name):
            if name == "input":
                return self.engine.shape if self.shape is None else self.shape
            if features is None:
                return (-1, classes) if self.shape is None else (self.shape[0], classes)
            _, channels, s = next(f for f in features if f[0] == name)
            if self.shape is None:  # an output dim that a runtime input dim decides reads -1 until it is set
                return (-1, channels, -1, -1)
            return (self.shape[0], channels, self.shape[2] // s, self.shape[3] // s)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            record("execute_async_v3", stream, sorted(self.addresses))
            n = int(np.prod(self.shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["input"])).reshape(self.shape)
            if features is None:
                outs = {"logits": fake_logits(x, classes)}
            else:
                outs = {f[0]: out for f, out in zip(features, fake_features(x, features), strict=True)}
            for name, out in outs.items():
                ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
            return True

    class Engine:
        names = ("input", *(["logits"] if features is None else [f[0] for f in features]))
        num_io_tensors = len(names)

        def __init__(self, logger) -> None:
            self.logger = logger
            batch = profile or (1, 1, 1)
            h, w = profile_hw or ((chw[1],) * 3, (chw[2],) * 3)
            self.low, self.opt, self.high = ((batch[k], chw[0], h[k], w[k]) for k in range(3))
            self.shape = (1 if profile is None else -1, chw[0], *((-1, -1) if profile_hw else chw[1:]))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def get_tensor_shape(self, name):
            return Context(self).get_tensor_shape(name)  # no input shape set: -1 wherever a runtime dim decides

        def get_tensor_profile_shape(self, name, index):
            record("get_tensor_profile_shape", name, index)
            return [self.low, self.opt, self.high]

        def create_execution_context(self):
            return Context(self)

        def create_engine_inspector(self):
            if inspector_json is None:
                raise AttributeError("'tensorrt.ICudaEngine' object has no attribute 'create_engine_inspector'")
            return types.SimpleNamespace(
                execution_context=None, get_engine_information=lambda fmt: json.dumps(inspector_json)
            )

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, plan):
            record("deserialize_cuda_engine", self.engine_host_code_allowed)
            if load_error is not None or not bytes(plan).startswith(MAGIC):
                self.logger.log(ILogger.ERROR, load_error or "stand-in: not a plan")
                return None
            return Engine(self.logger)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


# IEngineInspector JSON in the two schemas (shapes as documented; 11.x per-tensor keys are not verified).
INSPECTOR_10 = {
    "Layers": [
        {
            "Name": "conv1",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "x", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
            "Outputs": [{"Name": "y", "Format/Datatype": "Row major Int8 format"}],
        },
        {
            "Name": "gelu",
            "LayerType": "PointWiseV2",
            "Inputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
        },
        {"Name": "reformat", "LayerType": "Reformat", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
        {"Name": "head", "LayerType": "gemm", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]},
    ],
    "Bindings": ["input", "logits"],
}
INSPECTOR_11 = {
    "Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution", "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "x"}]},
        {"Name": "gelu", "LayerType": "PointWiseV2", "Inputs": [{"Name": "y", "DataType": "Half"}]},
        {"Name": "noop", "LayerType": "NoOp", "Inputs": [{"Name": "z", "DataType": "Float"}]},
    ],
    "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}],
}
