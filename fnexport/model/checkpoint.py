"""Checkpoint layouts users bring, remapped onto the official FasterNet names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import struct
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fnexport.console import log
from fnexport.errors import BadInput, what_is
from fnexport.model.fasternet import ACTS, VARIANTS, FasterNet, FasterNetConfig, as_backbone, default_act

# Wrappers training frameworks put around the weights, in the order we look for them.
WRAPPER_KEYS = ("state_dict", "model", "ema", "model_ema", "state_dict_ema", "module")
# Prefixes a whole-model wrapper adds to every key: Lightning, DDP, torch.compile.
STRIP_PREFIXES = ("model.", "module.", "_orig_mod.")
# Distillation weights stored beside the student in the official Lightning checkpoints.
IGNORE_PREFIXES = ("teacher_model.",)
# timm re-indexes stages 0..3 and moves each merging layer inside the next stage.
# Order matters: the more specific prefix (with .downsample.) comes first.
TIMM_TO_OFFICIAL = (
    ("stages.1.downsample.", "stages.1."),
    ("stages.1.", "stages.2."),
    ("stages.2.downsample.", "stages.3."),
    ("stages.2.", "stages.4."),
    ("stages.3.downsample.", "stages.5."),
    ("stages.3.", "stages.6."),
    ("conv_head.", "avgpool_pre_head.1."),
    ("classifier.", "head."),
)
# timm's features_only model (FeatureListNet, flatten_sequential) names the stages stages_0..stages_3.
TIMM_FEATURES_STAGE = re.compile(r"^stages_(\d+)\.")
# mmdetection / mmsegmentation: the detector's state_dict holds the backbone under this prefix beside the
# neck and heads (`neck.`, `rpn_head.`, `roi_head.`, `decode_head.`, `data_preprocessor.`, ...).
DETECTOR_BACKBONE = "backbone."
LABEL_KEYS = ("labels", "class_names", "classes")
# The PaddlePaddle CIFAR-10 tutorial's names (whole keys; `j` is the block, merging layers sit at odd `feature`
# indices). Its BN buffers are `_mean`/`_variance`; its `fc.weight` is stored (in, out), see _from_paddle.
PADDLE_TO_OFFICIAL = (
    (r"stem\.0\.weight", r"patch_embed.proj.weight"),
    (r"stem\.1\.(\w+)", r"patch_embed.norm.\1"),
    (r"feature\.(\d+)\.(\d+)\.pconv\.conv\.weight", r"stages.\1.blocks.\2.spatial_mixing.partial_conv3.weight"),
    (r"feature\.(\d+)\.(\d+)\.conv1\.weight", r"stages.\1.blocks.\2.mlp.0.weight"),
    (r"feature\.(\d+)\.(\d+)\.bn\.(\w+)", r"stages.\1.blocks.\2.mlp.1.\3"),
    (r"feature\.(\d+)\.(\d+)\.conv2\.weight", r"stages.\1.blocks.\2.mlp.3.weight"),
    (r"feature\.(\d+)\.0\.weight", r"stages.\1.reduction.weight"),
    (r"feature\.(\d+)\.1\.(\w+)", r"stages.\1.norm.\2"),
    (r"conv1\.weight", r"avgpool_pre_head.1.weight"),
    (r"fc\.(weight|bias)", r"head.\1"),
)
PADDLE_BN_BUFFERS = {"_mean": "running_mean", "_variance": "running_var"}
# paddle.save writes this name map beside the arrays; it is not a weight.
PADDLE_NAME_TABLE = "StructuredToParameterName@@"
# All a `.pdparams` pickle needs to rebuild float arrays; numpy 2 writes `numpy._core`, numpy 1 `numpy.core`.
# Anything else named in the file is refused before it is imported, so nothing from the file runs.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2 without the `_core` alias
    from numpy.core.multiarray import _reconstruct
PDPARAMS_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
# torch.save(..., _use_new_zipfile_serialization=False) starts with this number pickled (torch/serialization.py).
TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Files people pass by mistake, by suffix: named as what they are (never sent to the unpickler's advice).
NOT_CHECKPOINTS = {
    ".onnx": "an ONNX model (an exported artifact, not a training checkpoint)",
    ".ort": "an ONNX Runtime model (an exported artifact)",
    ".xml": "an OpenVINO IR or other XML file",
    ".engine": "a TensorRT engine",
    ".plan": "a TensorRT engine",
    ".mlmodel": "a Core ML model",
    ".tflite": "a TensorFlow Lite model",
    ".pte": "an ExecuTorch program",
    ".h5": "a Keras/HDF5 file",
    ".npz": "a numpy archive",
    ".npy": "a numpy array",
}
# Damaged weights: the first one found is named (the artifact would inherit it and parity would blame the artifact).
BN_VAR = "running_var"


@dataclass
class Checkpoint:
    """A loaded FasterNet (eval mode, as trained) and where it came from."""

    model: FasterNet
    config: FasterNetConfig
    path: str
    sha256: str | None
    layout: str
    labels: list[str] | None = None

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.sha256 else self.path

    def source(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "layout": self.layout}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(
    spec: str | Path, act: str | None = None, unsafe_load: bool = False, features: bool = False
) -> Checkpoint:
    """Load a checkpoint file, or build a randomly initialised model from a variant name; `features` exports a
    classifier's stem and stages as a backbone (a backbone checkpoint is one already)."""
    ckpt = _load(str(spec), check_act(act), unsafe_load)
    return as_features(ckpt) if features else ckpt


def as_features(ckpt: Checkpoint) -> Checkpoint:
    """A classifier's stem and stages as a backbone (--features); a backbone as it is."""
    if ckpt.config.features:
        return ckpt
    model = as_backbone(ckpt.model)
    log.info("%s: exporting the classifier's four stage outputs as a backbone (--features)", ckpt.path)
    return Checkpoint(model, model.cfg, ckpt.path, ckpt.sha256, ckpt.layout + " as backbone (--features)")


def _load(spec: str, act: str | None, unsafe_load: bool) -> Checkpoint:
    if spec in VARIANTS and not Path(spec).exists():
        cfg = VARIANTS[spec]
        if act:
            cfg = dataclasses.replace(cfg, act=act)
        log.warning("%s: no weights given, building a randomly initialised model (nothing is downloaded)", spec)
        torch.manual_seed(0)
        return Checkpoint(FasterNet(cfg).eval(), cfg, spec, None, "random-init")
    path = Path(spec)
    if path.is_dir():
        raise BadInput(f"{path}: is a folder; give the checkpoint file in it (.pth, .pt, .ckpt, .pdparams)")
    if not path.is_file():
        known = ", ".join(VARIANTS)
        raise BadInput(f"{path}: {what_is(path)} (give a checkpoint path or a variant name: {known})")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: the file is empty; re-copy or re-save the checkpoint")
    obj, file_labels = _read(path, unsafe_load)
    return _build(obj, path, sha256_file(path), act, file_labels)


def from_module(module: nn.Module, act: str | None = None) -> Checkpoint:
    """A Checkpoint from a FasterNet in memory (fnexport's, the official code's or timm's), read through its
    state_dict() like a file of the same layout; the weights are copied, the module is left as it is."""
    what = f"nn.Module {type(module).__name__}"
    return _build(module.state_dict(), Path(what), None, check_act(act), None)


def _build(obj: object, path: Path, sha256: str | None, act: str | None, file_labels: list[str] | None) -> Checkpoint:
    """Unwrap, remap and check the weights of `obj` (from a file or a module) and fit them into a FasterNet."""
    state, layout = _state_dict(obj, path)
    check_tensors(state, path)
    cfg = infer_config(state, path, act)
    if layout.startswith("paddle"):
        cfg = dataclasses.replace(cfg, post_norm_act=True)
    # Shapes are checked on a weightless model first: a checkpoint whose stem claims a huge width cannot
    # make fnexport allocate a model its file does not hold.
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": that is the point
        _fit(FasterNet(cfg), state, path, layout)
    model = FasterNet(cfg)
    _fit(model, state, path, layout)
    labels = None
    if not cfg.features:  # a backbone has no classes to name
        labels = _checked_labels(file_labels if file_labels is not None else _labels(obj), cfg.num_classes, path)
    return Checkpoint(model.eval(), cfg, str(path), sha256, layout, labels)


def check_act(act: str | None) -> str | None:
    """--act is gelu or relu, exactly as the manifest records it; anything else is bad input, named."""
    if act is None:
        return None
    if act not in ACTS:
        hint = f"did you mean {act.lower()}? " if str(act).lower() in ACTS else ""
        raise BadInput(f"--act {act}: {hint}FasterNet uses {' or '.join(ACTS)} (lowercase)")
    return act


def _fit(model: FasterNet, state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        shapes = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        raise BadInput(f"{path}: weights do not fit a FasterNet ({'; '.join(shapes[:2]) or err})") from None
    if result.missing_keys or result.unexpected_keys:
        raise BadInput(f"{path}: {layout} layout does not match a FasterNet: {_summary(result)}")


def check_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Damaged weights are the checkpoint's fault, named here: NaN/Inf anywhere, a negative BatchNorm variance,
    an empty tensor (a 0-class head). Otherwise parity would blame a faithful artifact."""
    for key, value in state.items():
        if value.numel() == 0:
            raise BadInput(f"{path}: {key} is empty (shape {list(value.shape)}); a FasterNet has no empty layers")
        # A NaN or Inf makes the sum non-finite: one pass without a mask (L, 94M values, loaded 2-core machine:
        # 0.02-1.0 s against 1.2-2.4 s for isfinite().all());
        # only then (or when finite values overflow the sum) the exact, slower count.
        if (
            value.is_floating_point()
            and not bool(torch.isfinite(value.sum()))
            and not bool(torch.isfinite(value).all())
        ):
            bad = int((~torch.isfinite(value)).sum())
            raise BadInput(
                f"{path}: {key} holds {bad} NaN/Inf value(s); the checkpoint is damaged (diverged training?), "
                "use an earlier one"
            )
        if key.endswith(BN_VAR) and value.is_floating_point() and bool((value < 0).any()):
            raise BadInput(
                f"{path}: {key} has negative values, which a BatchNorm variance cannot have; the checkpoint is damaged"
            )


def _checked_labels(labels: list[str] | None, num_classes: int, path: Path) -> list[str] | None:
    """Class names stored in the checkpoint, if they fit its head; otherwise ignored with a warning.

    Ignored, not refused: the weights are fine, names are optional, and --labels FILE replaces them."""
    if labels is None:
        return None
    if len(labels) != num_classes or len(set(labels)) != len(labels) or not all(labels):
        log.warning(
            "%s: its %d stored labels do not name its %d classes one-to-one; ignoring them (give --labels FILE)",
            path,
            len(labels),
            num_classes,
        )
        return None
    return labels


def _read(path: Path, unsafe_load: bool) -> tuple[object, list[str] | None]:
    """The unpickled (or safetensors) content and any labels stored beside the weights outside the pickle."""
    if path.suffix == ".pdparams":
        return _read_pdparams(path), None
    with open(path, "rb") as f:
        head = f.read(64)
    if zipfile.is_zipfile(path):
        # Damage inside the pickle reads as "unsupported global" to the safe unpickler, whose advice
        # (--unsafe-load) would be wrong here: the zip's CRCs tell corruption apart (~15 ms for T0).
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            pickled = any(n.endswith("data.pkl") for n in zf.namelist())
        if bad is not None:
            raise BadInput(f"{path}: corrupted ({bad} fails its CRC check); re-copy or re-save the checkpoint")
        if not pickled:
            raise BadInput(f"{path}: {_what(path, head) or 'a zip archive'}, not a PyTorch checkpoint (no data.pkl)")
        return _torch_load(path, unsafe_load), None
    if _is_safetensors(path, head):
        return _read_safetensors(path)
    if head.startswith(b"\x80"):  # a bare pickle: torch's legacy format, or Paddle's arrays
        if TORCH_LEGACY_MAGIC in head[:32]:
            return _torch_load(path, unsafe_load, legacy=True), None
        return _read_pdparams(path), None
    if head.startswith(b"PK\x03\x04"):
        raise BadInput(f"{path}: truncated or not a PyTorch checkpoint (a zip without its directory); re-copy it")
    what = _what(path, head) or "not a PyTorch checkpoint (.pth/.pt/.ckpt), safetensors or Paddle file"
    raise BadInput(f"{path}: {what}; give the checkpoint the model was trained into")


def _what(path: Path, head: bytes) -> str | None:
    """What a non-checkpoint file is, from its suffix or first bytes, if recognisable."""
    if path.suffix.lower() in NOT_CHECKPOINTS:
        return "is " + NOT_CHECKPOINTS[path.suffix.lower()]
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8\xff"):
        return "is an image"
    if head.lstrip().startswith((b"{", b"[")):
        return "is JSON text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return "is text"


def _torch_load(path: Path, unsafe_load: bool, legacy: bool = False) -> object:
    if legacy and not unsafe_load:
        # torch's weights-only unpickler reads only pickle protocol 2 (legacy files written with protocol 4 fail
        # on its FRAME opcode); the standard unpickler restricted to the same safe globals reads every protocol.
        kwargs: dict = {"weights_only": False, "pickle_module": _RESTRICTED_PICKLE}
    else:
        kwargs = {"weights_only": not unsafe_load}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", **kwargs)
    except pickle.UnpicklingError as err:
        if isinstance(err, _Refused) or "weights_only" in str(err) or "Weights only load failed" in str(err):
            first = str(err).split("Please file an issue")[0].strip().splitlines()
            why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise BadInput(
                f"{path}: refused to unpickle Python objects ({why or 'not plain tensors'}); "
                "it may run code. If you trust the file, pass --unsafe-load"
            ) from None
        raise BadInput(f"{path}: not a readable checkpoint ({err}); re-save it with torch.save") from None
    except Exception as err:  # a damaged file fails anywhere inside the unpickler (KeyError, struct.error, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(
            f"{path}: truncated or not a PyTorch checkpoint ({reason[:120]}); re-copy or re-save it"
        ) from None


def _is_safetensors(path: Path, head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    return 2 <= struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The tensors of a .safetensors file (no code can run: it holds only a JSON header and raw data), and class
    names if its metadata holds a JSON list under labels/class_names/classes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BadInput(f"{path}: truncated or not a safetensors file ({str(err)[:120]}); re-copy it") from None
    labels = None
    for key in LABEL_KEYS:
        if key in meta:
            try:
                value = json.loads(meta[key])
            except json.JSONDecodeError:
                value = None
            labels = list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
            break
    return state, labels


class _Refused(pickle.UnpicklingError):
    """The pickle names a global outside the allowed ones."""


class _SafeGlobalsUnpickler(pickle.Unpickler):
    """Python's unpickler, resolving only the globals torch's weights-only loader allows (tensors, storages)."""

    def find_class(self, module: str, name: str) -> object:
        allowed = torch._weights_only_unpickler._get_allowed_globals()
        obj = allowed.get(f"{module}.{name}")
        if obj is None:
            raise _Refused(f"Unsupported global: GLOBAL {module}.{name}")
        return obj


# torch.load(pickle_module=...) reads legacy files through this module's Unpickler and load().
_RESTRICTED_PICKLE = types.ModuleType("fnexport_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _SafeGlobalsUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = lambda f, **kw: _SafeGlobalsUnpickler(f, **kw).load()  # type: ignore[attr-defined]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return PDPARAMS_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _read_pdparams(path: Path) -> dict[str, object]:
    """A paddle.save()d state dict as torch tensors, unpickled with numpy's array globals only."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except _Refused as err:
        raise BadInput(
            f"{path}: refused to unpickle {err} (a .pdparams holds only numpy arrays; this file may run code)"
        ) from None
    except Exception as err:  # only the unpickler ran, on the file's bytes: whatever it raised, the file is bad
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"{path}: truncated or not a Paddle .pdparams file ({reason[:120]}); re-copy it") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: holds a {type(obj).__name__}, not a Paddle state dict (save model.state_dict())")
    state: dict[str, object] = {}
    for key, value in obj.items():
        if key == PADDLE_NAME_TABLE:
            continue
        if isinstance(value, np.ndarray):
            if value.dtype.kind != "f":
                raise BadInput(f"{path}: {key} is a {value.dtype} array, not floating-point weights")
            value = torch.tensor(value, dtype=torch.float32)
        state[key] = value
    return state


def _labels(obj: object) -> list[str] | None:
    if isinstance(obj, dict):
        for key in LABEL_KEYS:
            value = obj.get(key)
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
                return list(value)
    return None


# Wrappers nest a few levels at most ({"state_dict": {"model": {"module": ...}}}); a pickle can even hold a dict
# that contains itself, so unwrapping stops after this many levels instead of looping.
MAX_WRAPPERS = 8


def _state_dict(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Unwrap, strip prefixes and remap to official keys; returns the state dict and the layout name."""
    wrappers: list[str] = []
    for _ in range(MAX_WRAPPERS + 1):
        if isinstance(obj, nn.Module):
            wrappers.append("pickled module")
            obj = obj.state_dict()
            continue
        if not isinstance(obj, dict):
            raise BadInput(f"{path}: holds a {type(obj).__name__}, not a FasterNet state dict")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if any(str(k).endswith("patch_embed.proj.weight") or k == "stem.0.weight" for k in tensors):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), (dict, nn.Module))), None)
        if key is None:
            sample = ", ".join(list(map(str, obj))[:6])
            raise BadInput(
                f"{path}: no FasterNet weights found (top-level keys: {sample}); is this a FasterNet checkpoint?"
            )
        wrappers.append(key)
        obj = obj[key]
    else:
        raise BadInput(f"{path}: weights wrapped more than {MAX_WRAPPERS} levels deep ({' > '.join(wrappers[:4])} ...)")
    state = {
        k: v
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor) and not k.startswith(IGNORE_PREFIXES)
    }
    ignored = len(obj) - len(state)
    if not state:
        raise BadInput(f"{path}: no student weights: every tensor is under {', '.join(IGNORE_PREFIXES)} (ignored)")
    # Each pass shortens every key, so this ends; and an empty dict (every key ignored) has no prefix to strip.
    while state and (prefix := next((p for p in STRIP_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        wrappers.append(prefix.rstrip("."))
    layout = "official"
    if "state_dict" in wrappers and "model" in wrappers:
        layout = "lightning"
    if DETECTOR_BACKBONE + "patch_embed.proj.weight" in state:
        layout = "mmdet"
        backbone = {k[len(DETECTOR_BACKBONE) :]: v for k, v in state.items() if k.startswith(DETECTOR_BACKBONE)}
        log.info(
            "%s: a detector/segmenter checkpoint (mmdetection layout): exporting only its backbone "
            "(%d tensors); %d other tensors (neck, heads) left out",
            path,
            len(backbone),
            len(state) - len(backbone),
        )
        state = backbone
    if any(TIMM_FEATURES_STAGE.match(k) for k in state):
        state = {TIMM_FEATURES_STAGE.sub(r"stages.\1.", k): v for k, v in state.items()}
    if "conv_head.weight" in state or any(".downsample." in k for k in state):
        layout = "timm"
        state = {_remap(k, TIMM_TO_OFFICIAL): v for k, v in state.items()}
    if "stem.0.weight" in state:
        layout = "paddle"
        state = _from_paddle(state)
    if ignored:
        log.info("%s: ignored %d non-student entries (e.g. teacher_model.*)", path, ignored)
    if wrappers:
        layout += " (" + " > ".join(wrappers) + ")"
    return state, layout


def _remap(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _from_paddle(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names for the Paddle tutorial's keys; unknown keys pass through for load to report."""
    out = {}
    for key, value in state.items():
        for pattern, repl in PADDLE_TO_OFFICIAL:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, repl, key)
                head, _, leaf = key.rpartition(".")
                key = f"{head}.{PADDLE_BN_BUFFERS.get(leaf, leaf)}"
                break
        # paddle.nn.Linear stores its weight (in, out); torch's nn.Linear wants (out, in).
        out[key] = value.t().contiguous() if key == "head.weight" else value
    return out


def infer_config(state: dict[str, torch.Tensor], path: Path, act: str | None) -> FasterNetConfig:
    """Read width, depths, n_div, mlp ratio, head and classes off tensor shapes."""
    try:
        stem = state["patch_embed.proj.weight"]
        if stem.dim() != 4:
            raise BadInput(f"{path}: patch_embed.proj.weight has shape {list(stem.shape)}, not a 4-D conv weight")
        embed_dim, in_chans = stem.shape[0], stem.shape[1]
        blocks: dict[int, set[int]] = {}
        for key in state:
            m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
            if m:
                blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        if sorted(blocks) != list(range(0, 2 * len(blocks), 2)):
            raise KeyError(f"stages {sorted(blocks)} are not 0, 2, 4, ...")
        # The model is built with as many blocks as the keys name: they must be 0..n-1, so a key such as
        # blocks.100000 cannot make fnexport build 100001 blocks.
        gaps = {stage: ids for stage, ids in blocks.items() if ids != set(range(len(ids)))}
        if gaps:
            stage, ids = next(iter(gaps.items()))
            raise BadInput(f"{path}: stage {stage} has blocks {sorted(ids)[:6]}..., not 0..{len(ids) - 1}")
        depths = {stage: len(ids) for stage, ids in blocks.items()}
        pconv = state["stages.0.blocks.0.spatial_mixing.partial_conv3.weight"].shape[0]
        hidden = state["stages.0.blocks.0.mlp.0.weight"].shape[0]
        # No head at all: a backbone (official fork_feat, mmdetection, timm features_only).
        features = not any(k.startswith(("head.", "avgpool_pre_head.")) for k in state)
        feature_dim = 0 if features else state["avgpool_pre_head.1.weight"].shape[0]
        num_classes = 0 if features else state["head.weight"].shape[0]
    except KeyError as err:
        raise BadInput(f"{path}: not a FasterNet classifier or backbone checkpoint (missing {err})") from None
    if in_chans != 3:
        raise BadInput(
            f"{path}: the stem takes {in_chans} input channel(s); fnexport feeds RGB images (3 channels), "
            "so only 3-channel FasterNets convert"
        )
    if embed_dim % pconv:
        raise BadInput(f"{path}: PConv width {pconv} does not divide embed_dim {embed_dim}")
    chosen = act or default_act(embed_dim)
    if chosen is None:
        raise BadInput(
            f"{path}: embed_dim {embed_dim} is not a paper variant, so the activation cannot be "
            "read off the weights; pass --act gelu or --act relu"
        )
    return FasterNetConfig(
        embed_dim=embed_dim,
        depths=tuple(depths[k] for k in sorted(depths)),
        act=chosen,
        num_classes=num_classes,
        n_div=embed_dim // pconv,
        mlp_ratio=hidden / embed_dim,
        feature_dim=feature_dim,
        layer_scale=any(k.endswith(".layer_scale") for k in state),
        in_chans=in_chans,
        features=features,
        out_norms=features and "norm0.weight" in state,
    )


def _summary(result: object) -> str:
    parts = []
    for name in ("missing_keys", "unexpected_keys"):
        keys = getattr(result, name)
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {name.replace('_', ' ')} ({shown})")
    return "; ".join(parts)
