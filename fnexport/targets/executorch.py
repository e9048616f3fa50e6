"""ExecuTorch: a .pte program with the XNNPACK delegate for Android/iOS CPUs, FP32 or INT8 (PT2E); run here too."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fnexport.console import log, require
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Source

PTE = "model.pte"
DELEGATE = "XnnpackBackend"
# The executorch release fnexport is tested with, and the torch minor each executorch minor is built against.
# The wheel declares no torch requirement, yet its runtime (_C.so) links libtorch_cpu, libtorch_python and
# libc10 (117 C++ symbols), so pip never stops a mismatched pair: fnexport checks it before importing.
TESTED = "1.5.1"
TORCH_FOR_EXECUTORCH = {"1.5": "2.13"}
CALIB_CHUNK = 32
PIP_LINE = f"pip install 'executorch=={TESTED}' (or pip install -c constraints.txt 'fnexport[executorch]')"


def minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_mismatch() -> str | None:
    """Why the installed executorch cannot run beside this torch; None when it can (or is not installed)."""
    try:
        installed = importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    need = TORCH_FOR_EXECUTORCH.get(minor(installed))
    have = torch.__version__
    if need is None:
        return (
            f"executorch {installed} is not a release fnexport has checked: each ExecuTorch wheel links the C++ "
            f"libraries of one torch release, and fnexport keeps torch {have} (pinned) rather than replace it; "
            f"install the release built for it: {PIP_LINE}"
        )
    if need != minor(have):
        return (
            f"executorch {installed} is built against torch {need}, but torch {have} is installed (fnexport pins "
            f"torch 2.13.0 and never replaces it); install the pair: pip install 'torch==2.13.0' 'executorch=={TESTED}' "
            "--extra-index-url https://download.pytorch.org/whl/cpu"
        )
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torchao logs its missing CUDA kernels at import and torch.export warns about its own deprecations."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "executorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_executorch(module: str) -> str:
    """Import an executorch module once the torch pairing holds (exit 3 with the pip line otherwise); the version."""
    problem = torch_mismatch()
    if problem:
        raise BackendUnavailable(problem)
    with quiet():
        require(module, "executorch")
    return importlib.metadata.version("executorch")


def xnnpack_partitioner() -> Any:
    """XNNPACK's partitioner with every op config it has (convolution included)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner()


def lower(program: torch.export.ExportedProgram, partitioner: Any = None) -> tuple[Any, dict[str, Any]]:
    """Edge program with what XNNPACK takes delegated, and what was delegated; CheckFailed if a conv is not."""
    with quiet():
        from executorch.devtools.backend_debug import get_delegation_info
        from executorch.exir import to_edge_transform_and_lower

        edge = to_edge_transform_and_lower(program, partitioner=[partitioner or xnnpack_partitioner()])
    graph = edge.exported_program().graph_module
    info = get_delegation_info(graph)
    # getitem unpacks a delegate's outputs: bookkeeping, not compute.
    outside = {op: n.non_delegated for op, n in info.delegation_by_operator.items() if n.non_delegated}
    outside.pop("getitem", None)
    convs = [n.name for n in graph.graph.nodes if n.op == "call_function" and "convolution" in str(n.target)]
    if convs:
        raise CheckFailed(
            f"{len(convs)} convolution(s) would run outside XNNPACK on ExecuTorch's portable kernels "
            f"({', '.join(convs[:5])}{', ...' if len(convs) > 5 else ''}); nothing written"
        )
    if info.num_delegated_subgraphs != 1:
        log.warning(
            "XNNPACK delegate cut into %d partitions; ops outside it: %s", info.num_delegated_subgraphs, outside
        )
    return edge, {
        "delegate": DELEGATE,
        "partitions": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "ops_outside_delegate": outside,
        "convs_outside_delegate": 0,
    }


def xnnpack_int8_config(per_channel: bool = True) -> Any:
    """XNNPACKQuantizer's static INT8 scheme: int8 weights symmetric, activations int8 per-tensor (histogram)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    return get_symmetric_quantization_config(is_per_channel=per_channel)


def quantize_int8(
    model: torch.nn.Module, example: torch.Tensor, calib_x: np.ndarray, config: Any = None
) -> torch.export.ExportedProgram:
    """PT2E post-training INT8: prepare with XNNPACKQuantizer(config), calibrate on calib_x, convert, export.

    One call per setting to try (`config`: xnnpack_int8_config or another XNNPACKQuantizer config).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(config or xnnpack_int8_config())
    # Calibrate on a dynamic-batch graph, CALIB_CHUNK images a call: every call also observes all 45
    # weights and updates 113 histograms, so one image a call took 4.5x the CPU time (T0, 64 images).
    # The static program (batch 1 on phones) is exported from the converted model afterwards.
    batch = torch.export.Dim("batch", min=1, max=max(2, CALIB_CHUNK))
    two = torch.zeros(2, *example.shape[1:])  # torch.export specialises a dimension of size 1
    with quiet(), torch.no_grad():
        graph = torch.export.export(model, (two,), dynamic_shapes={"x": {0: batch}}).module()
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calib_x), CALIB_CHUNK):
            prepared(torch.from_numpy(calib_x[start : start + CALIB_CHUNK]))
        return torch.export.export(convert_pt2e(prepared), (example,))


def int8_details(config: Any, calib: Any) -> dict[str, Any]:
    """What the quantizer config does, read off the config itself, and the calibration data."""

    def spec(q: Any) -> str:
        observer = q.observer_or_fake_quant_ctr.p.func.__name__  # a partial of the observer class
        return f"{q.dtype} [{q.quant_min}, {q.quant_max}] {q.qscheme}, {observer}".replace("torch.", "")

    return {
        "quantizer": "PT2E (torchao prepare_pt2e/convert_pt2e) with XNNPACKQuantizer",
        "weights": spec(config.weight),
        "activations": spec(config.input_activation),
        "calibration": {"data": calib.source, "samples": len(calib.x), "skipped": len(calib.skipped)},
    }


class PteRunner:
    """A .pte run by the ExecuTorch runtime in the executorch wheel (XNNPACK kernels for x86 here)."""

    def __init__(self, artifact: Path, threads: int | None = None) -> None:
        version = load_executorch("executorch.runtime")
        with quiet():
            from executorch.extension.pybindings import portable_lib
            from executorch.runtime import Runtime

            runtime = Runtime.get()
        if not runtime.backend_registry.is_available(DELEGATE):
            raise BackendUnavailable(f"this executorch build has no {DELEGATE}: {PIP_LINE}")
        if threads:
            # Process-wide: ExecuTorch has one threadpool, shared by XNNPACK and its optimized kernels,
            # with no per-program setting (the API is marked unsafe/experimental).
            portable_lib._unsafe_reset_threadpool(threads)
        program = runtime.load_program(artifact)
        # Attributes are released in the order they were set when a runner is dropped without close():
        # the method before the program it was loaded from, as close() does.
        self.method = program.load_method("forward")
        self.program = program
        self.batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])
        self.info = {
            "runtime": f"executorch {version} ({DELEGATE})",
            "threads": portable_lib._threadpool_get_thread_count(),
            "threads_scope": "process-wide ExecuTorch threadpool",
        }

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        out = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, np.float32))])
        arrays = [o.numpy().copy() for o in out]  # copies: the method reuses its output buffers
        return arrays[0] if len(arrays) == 1 else arrays  # a backbone: its feature maps in stride order

    def close(self) -> None:
        del self.method, self.program


class ExecutorchTarget:
    name: ClassVar[str] = "executorch"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    # slice_cat: T0 lowers to 1 XNNPACK partition (113 nodes). split_cat gives 14 (its 13
    # split_with_sizes_copy run on portable kernels between them), and the in-place `slicing`
    # form does not lower at all ("Output node ... is already in the inputs").
    pconv_form: ClassVar[str] = "slice_cat"
    packages: ClassVar[dict[str, str]] = {"executorch": "executorch", "torchao": "executorch"}

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        version = load_executorch("executorch.exir")
        if recipe.dynamic:
            # A symbolic batch leaves the 26 slices outside XNNPACK (15 partitions on T0); phones run batch 1.
            raise BadInput("--target executorch: --dynamic is not offered; use a static --batch (default 1)")
        cfg = src.ckpt.config
        model = src.module(self.pconv_form)
        # A backbone (fixed H x W; --dynamic-hw is refused by the recipe) returns its four maps in stride order.
        example = torch.zeros(recipe.batch, cfg.in_chans, *recipe.hw)
        details: dict[str, Any] = {
            "format": "ExecuTorch program (.pte)",
            "conversion": f"torch.export of the {self.pconv_form} model, executorch {version} "
            "to_edge_transform_and_lower with XnnpackPartitioner",
            "pconv_form": self.pconv_form,
            "method": "forward",
            "input_shape": list(example.shape),
        }
        if recipe.precision == "int8":
            calib = src.calibration()
            config = xnnpack_int8_config()
            program = quantize_int8(model, example, calib.x, config)
            details["quantization"] = int8_details(config, calib)
        else:
            with quiet():
                program = torch.export.export(model, (example,))
        edge, delegation = lower(program)
        details |= delegation
        path = out_dir / PTE
        with quiet():
            path.write_bytes(edge.to_executorch().buffer)
        return Exported(path, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> PteRunner:
        return PteRunner(artifact, threads)
