"""TensorRT's CUDA side: which GPU this is, and device buffers on one stream, through NVIDIA's cuda-bindings.

cuda-bindings rather than torch.cuda: fnexport pins a CPU torch (constraints.txt) and a CUDA torch would replace
it, while NVIDIA's own TensorRT Python samples moved from pycuda to cuda-bindings (TensorRT 10.14 changelog).
Only `cuda.bindings.runtime` is used: it exists from cuda-bindings 12.8 on and in 13.x, where the old
`cuda.cudart` module is gone. Every call returns a tuple whose first item is a `cudaError_t`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType
from typing import Any

import numpy as np

from fnexport.errors import BackendUnavailable, FnexportError

# The spec in pyproject's `tensorrt` extra (and `dev`, which tests the no-driver path against the real package).
# 12.9.2 is the first 12.x with cuda.bindings.utils.get_cuda_native_handle; 12.x also runs on CUDA 13 drivers.
CUDA_BINDINGS = {"12": "cuda-bindings>=12.9.2,<13", "13": "cuda-bindings>=13.0,<14"}

# cudaError_t names that mean "no usable NVIDIA GPU here", not a bug. Measured with cuda-bindings 12.9.10 on a
# machine without a driver: cudaGetDeviceCount returns cudaErrorInsufficientDriver (35), not an exception.
NO_GPU = {
    "cudaErrorInsufficientDriver",
    "cudaErrorNoDevice",
    "cudaErrorDevicesUnavailable",
    "cudaErrorSystemDriverMismatch",
    "cudaErrorCompatNotSupportedOnDevice",
}


def install_hint() -> str:
    """The pip line for cuda-bindings that matches the installed TensorRT wheel's CUDA major."""
    for major in ("13", "12"):
        try:
            importlib.metadata.version(f"tensorrt-cu{major}")
        except importlib.metadata.PackageNotFoundError:
            continue
        return f"pip install '{CUDA_BINDINGS[major]}' (matches tensorrt-cu{major})"
    return (
        f"pip install '{CUDA_BINDINGS['12']}' (works with CUDA 12 and 13 drivers), "
        f"or '{CUDA_BINDINGS['13']}' beside a CUDA 13 TensorRT"
    )


def cudart() -> ModuleType:
    """cuda.bindings.runtime, or BackendUnavailable naming exactly what to install."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except (ImportError, RuntimeError) as err:
        raise BackendUnavailable(
            f"cuda-bindings is not installed (fnexport moves TensorRT's inputs and outputs with it): "
            f"{install_hint()}, or pip install 'fnexport[tensorrt]' ({err})"
        ) from err


def call(rt: ModuleType, name: str, *args: Any) -> Any:
    """Call cuda.bindings.runtime.`name`, raise on its error code, return what follows the code."""
    try:
        result = getattr(rt, name)(*args)
    except RuntimeError as err:  # cuda-bindings 12.8.0 raises when libcuda.so.1 is missing (12.9+ returns 35)
        raise BackendUnavailable(f"no NVIDIA driver here ({err}): TensorRT engines need an NVIDIA GPU") from err
    err, rest = result[0], result[1:]
    if int(err) != 0:
        code = getattr(err, "name", str(err))
        if code in NO_GPU:
            raise BackendUnavailable(
                f"CUDA {name}: {code}: no usable NVIDIA GPU and driver here; TensorRT engines are built and run on one"
            )
        if code == "cudaErrorMemoryAllocation":
            raise BackendUnavailable(f"CUDA {name}: out of GPU memory")
        raise FnexportError(f"CUDA {name} failed: {code}")
    return rest[0] if len(rest) == 1 else rest


def query_gpu(device: int = 0) -> dict[str, str]:
    """The CUDA device's name, compute capability and UUID, or BackendUnavailable."""
    rt = cudart()
    if call(rt, "cudaGetDeviceCount") < 1:
        raise BackendUnavailable("no CUDA GPU visible: TensorRT engines are built and run on an NVIDIA GPU")
    prop = call(rt, "cudaGetDeviceProperties", device)
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    h = bytes(prop.uuid.bytes).hex()
    # nvidia-smi -L prints UUIDs as GPU-8-4-4-4-12 hex digits; that this matches it byte for byte is unverified.
    uuid = "GPU-" + "-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:32]))
    return {"gpu": name.rstrip("\0").strip(), "compute_capability": f"{prop.major}.{prop.minor}", "gpu_uuid": uuid}


class CudaStream:
    """One non-blocking stream on device 0 and named device buffers that grow to the largest batch seen."""

    def __init__(self) -> None:
        self.rt = cudart()
        call(self.rt, "cudaSetDevice", 0)
        self.stream = call(self.rt, "cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
        try:
            native = importlib.import_module("cuda.bindings.utils").get_cuda_native_handle
        except (ImportError, AttributeError):  # cuda-bindings < 12.9.2: int() still gives the handle
            native = int
        # TensorRT's execute_async_v3 takes the stream as an int; stream.getPtr() would be the handle's address.
        self.handle = int(native(self.stream))
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` under `name`, reused across calls."""
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                call(self.rt, "cudaFree", ptr)
                del self.buffers[name]
            ptr = int(call(self.rt, "cudaMalloc", nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, ptr: int, host: np.ndarray) -> None:
        # From pageable numpy memory: CUDA stages the copy, so it is not truly asynchronous (pinned buffers
        # would overlap copies with compute; not measured, no GPU here).
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        call(self.rt, "cudaMemcpyAsync", ptr, host.ctypes.data, host.nbytes, kind, self.stream)

    def download(self, host: np.ndarray, ptr: int) -> None:
        """Copy into `host` and wait: the array must outlive the copy, and the caller reads it next."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call(self.rt, "cudaMemcpyAsync", host.ctypes.data, ptr, host.nbytes, kind, self.stream)
        call(self.rt, "cudaStreamSynchronize", self.stream)

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            call(self.rt, "cudaFree", ptr)
        self.buffers.clear()
        if self.stream is not None:
            call(self.rt, "cudaStreamDestroy", self.stream)
            self.stream = None
