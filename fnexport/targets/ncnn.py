"""ncnn: .ncnn.param + .ncnn.bin made by pnnx, for Android/iOS CPUs (FP32, or FP16 as ncnn runs it on ARM)."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from fnexport.console import console, log, require
from fnexport.errors import BadInput, CheckFailed, FnexportError
from fnexport.recipes import Recipe
from fnexport.targets.base import Exported, Source

MODEL_DIR, PARAM, BIN = "ncnn_model", "model.ncnn.param", "model.ncnn.bin"
# T0 converts in ~1 s; a pnnx that has not finished in this long is stuck, not slow.
PNNX_TIMEOUT_S = 900
# ncnn has no INT8 calibrator in its wheels (see recipes.py, which refuses `-t ncnn -p int8`).
PRECISIONS = ("fp32", "fp16")


def net_options(precision: str) -> dict[str, Any]:
    """The ncnn Option fields the runner sets before loading, so they are in the manifest too."""
    fp16 = precision == "fp16"
    return {
        # fp16: what ncnn does on ARM by default (fp16 storage and packing everywhere, fp16 arithmetic on
        # ARMv8.2 CPUs with asimdhp). On x86 only the storage takes effect: arithmetic stays fp32.
        # fp32: ncnn's defaults are all fp16 on, which alone cost 2.6e-3 max abs on T0 (1.9e-6 off).
        "use_fp16_storage": fp16,
        "use_fp16_packed": fp16,
        "use_fp16_arithmetic": fp16,
        "use_bf16_storage": False,
        "use_vulkan_compute": False,
        # ncnn's OpenMP workers spin 20 ms after each call by default; beside torch in one process
        # (parity, bench) they take the next engine's cores. An app running ncnn alone may keep 20.
        "openmp_blocktime": 0,
    }


def pnnx_command(binary: str, pt: Path, work: Path, shape: list[int], fp16: bool) -> list[str]:
    """pnnx with every output named (it writes 7 files beside its input otherwise) and the weight precision set."""
    outputs = {
        "ncnnparam": PARAM,
        "ncnnbin": BIN,
        "ncnnpy": "model_ncnn.py",
        "pnnxparam": "model.pnnx.param",
        "pnnxbin": "model.pnnx.bin",
        "pnnxpy": "model_pnnx.py",
        "pnnxonnx": "model.pnnx.onnx",
    }
    return [
        binary,
        str(pt),
        f"inputshape=[{','.join(map(str, shape))}]f32",
        # pnnx's default fp16=1 stores fp16 weights in the .bin: 2.5e-3 max abs on T0 even with
        # every ncnn fp16 option off. FP32 needs fp16=0.
        f"fp16={int(fp16)}",
        *(f"{key}={work / name}" for key, name in outputs.items()),
    ]


def run_pnnx(cmd: list[str]) -> str:
    """Run pnnx; its log (stderr) is returned, and shown on stderr when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FnexportError(f"pnnx did not finish in {PNNX_TIMEOUT_S} s: {' '.join(cmd)}") from None
    logtext = done.stderr + done.stdout
    if done.returncode != 0:
        console.print(logtext, markup=False, highlight=False)
        last = (logtext.strip().splitlines() or ["(no output)"])[-1]
        raise FnexportError(f"pnnx exited {done.returncode} ({last}); its log is above. Command: {' '.join(cmd)}")
    return logtext


def layer_types(param: Path) -> Counter:
    """Layer types in an ncnn text param (line 1 the magic 7767517, line 2 the counts, then one layer a line)."""
    lines = param.read_text().splitlines()
    if not lines or lines[0].strip() != "7767517":
        raise CheckFailed(f"{param.name}: not an ncnn text param (no 7767517 magic)")
    return Counter(line.split()[0] for line in lines[2:] if line.strip())


def check_loadable(ncnn: Any, param: Path, binary: Path, pnnx_log: str) -> tuple[str, list[str]]:
    """pnnx exits 0 on graphs ncnn cannot load (unknown ops stay as pnnx.Expression, aten::*): check both ways."""
    unknown = sorted(t for t in layer_types(param) if ncnn.layer_to_index(t) == -1)
    if unknown:
        log.error("pnnx log:\n%s", pnnx_log)
        raise CheckFailed(f"pnnx left layers ncnn does not have: {', '.join(unknown)}; nothing written")
    net = ncnn.Net()
    try:
        codes = (net.load_param(str(param)), net.load_model(str(binary)))
        if codes != (0, 0):
            raise CheckFailed(f"ncnn could not load the converted model (load_param, load_model = {codes})")
        # pnnx names the outputs out0, out1, ... in the order the traced forward returns them (stride order
        # for a backbone); ncnn lists them in layer order, so sort them by that number.
        outputs = sorted(net.output_names(), key=lambda name: int(name.removeprefix("out")))
        return net.input_names()[0], outputs
    finally:
        net.clear()


class NcnnRunner:
    """ncnn's Python Net with the manifest's options; ncnn takes one image (a c x h x w Mat) per extractor."""

    def __init__(self, folder: Path, details: dict[str, Any], threads: int | None = None) -> None:
        self.ncnn = require("ncnn", "ncnn")
        self.net = self.ncnn.Net()
        for key, value in details["runner_options"].items():
            setattr(self.net.opt, key, value)  # before loading: layers pick their kernels at load time
        if threads:
            self.net.opt.num_threads = threads
        codes = (self.net.load_param(str(folder / PARAM)), self.net.load_model(str(folder / BIN)))
        if codes != (0, 0):
            self.net.clear()
            raise CheckFailed(f"{folder}: ncnn could not load it (load_param, load_model = {codes})")
        # Manifests written before backbones named one "output_blob".
        outputs = details.get("output_blobs") or [details["output_blob"]]
        self.input_name, self.output_names = details["input_blob"], outputs
        self.batch = 1
        self.info = {
            "runtime": f"ncnn {self.ncnn.__version__}",
            "threads": self.net.opt.num_threads,
            "fp16_storage": self.net.opt.use_fp16_storage,
            # ncnn's fp16 arithmetic kernels are ARM ones (ARMv8.2 asimdhp); elsewhere it computes in fp32.
            "fp16_arithmetic": bool(self.net.opt.use_fp16_arithmetic and self.ncnn.cpu_support_arm_asimdhp()),
        }

    def __call__(self, x: np.ndarray) -> np.ndarray | list[np.ndarray]:
        per_image = [self.one(img) for img in np.ascontiguousarray(x, np.float32)]
        outs = [np.stack(maps) for maps in zip(*per_image, strict=True)]
        return outs[0] if len(outs) == 1 else outs  # a backbone: its feature maps in stride order

    def one(self, img: np.ndarray) -> list[np.ndarray]:
        """One image's outputs: logits flattened, a backbone's maps as c x h x w."""
        ex = self.net.create_extractor()
        mat = self.ncnn.Mat(img)  # c x h x w float32 -> a 3-D Mat
        outs = []
        try:
            if ex.input(self.input_name, mat) != 0:
                raise FnexportError(f"ncnn rejected the input blob {self.input_name!r}")
            for name in self.output_names:
                code, out = ex.extract(name)
                if code != 0:
                    raise FnexportError(f"ncnn extract({name!r}) returned {code}")
                array = np.array(out, np.float32)  # a copy
                del out
                outs.append(array if len(self.output_names) > 1 else array.reshape(-1))
        finally:
            # Every Mat and Extractor must be gone before net.clear(), or ncnn aborts the process.
            del ex, mat
        return outs

    def close(self) -> None:
        self.net.clear()
        del self.net


class NcnnTarget:
    name: ClassVar[str] = "ncnn"
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS
    # split_cat and slice_cat give the same ncnn graph (Split + Slice/Conv/Concat, 113 layers on T0; only
    # the Slice's parameter is written differently); `slicing` gives Crop + CopyTo, 18% more memory traffic.
    pconv_form: ClassVar[str] = "split_cat"
    packages: ClassVar[dict[str, str]] = {"ncnn": "ncnn", "pnnx": "ncnn"}

    def export(self, src: Source, out_dir: Path, recipe: Recipe) -> Exported:
        pnnx = require("pnnx", "ncnn")
        ncnn = require("ncnn", "ncnn")
        if recipe.batch != 1 or recipe.dynamic:
            raise BadInput("--target ncnn: ncnn runs one image per extractor (no batch dimension); use --batch 1")
        cfg = src.ckpt.config
        model = src.module(self.pconv_form)
        # A backbone (fixed H x W; --dynamic-hw is refused by the recipe) returns its four maps in stride order.
        shape = [1, cfg.in_chans, *recipe.hw]
        example = torch.zeros(shape)
        work = src.workdir / "pnnx"
        work.mkdir()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in torch 2.13; pnnx reads TorchScript
            torch.jit.trace(model, example).save(str(work / "model.pt"))
        fp16 = recipe.precision == "fp16"
        cmd = pnnx_command(pnnx.EXEC_PATH, work / "model.pt", work, shape, fp16)
        pnnx_log = run_pnnx(cmd)
        input_blob, output_blobs = check_loadable(ncnn, work / PARAM, work / BIN, pnnx_log)
        folder = out_dir / MODEL_DIR
        folder.mkdir()
        for name in (PARAM, BIN):
            shutil.copyfile(work / name, folder / name)
        details = {
            "format": "ncnn param + bin",
            "conversion": f"torch.jit.trace of the {self.pconv_form} model, pnnx {pnnx.__version__}",
            "pnnx_options": [cmd[2], cmd[3]],
            "pconv_form": self.pconv_form,
            "weights": "fp16" if fp16 else "fp32",
            "input_blob": input_blob,
            "output_blobs": output_blobs,  # in the manifest's output order
            "input_shape": shape[1:],  # ncnn Mats have no batch: c, h, w
            "runner_options": net_options(recipe.precision),
            "layers": dict(layer_types(folder / PARAM).most_common()),
        }
        return Exported(folder, details)

    def runner(self, artifact: Path, manifest: dict, threads: int | None = None, alone: bool = False) -> NcnnRunner:
        return NcnnRunner(artifact, manifest["details"], threads)
