"""A recipe: every choice one conversion makes, validated; CLI flags build or override one."""

from __future__ import annotations

import difflib
import importlib.metadata
import re
import sysconfig
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fnexport.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from fnexport.errors import BadInput, what_is
from fnexport.model.fasternet import FasterNetConfig, hw

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "palettize4", "palettize8")
# Sane maxima, checked before any work: a static batch and the input size decide the memory parity needs
# (batch 100000 or --crop-pct 0.001, a 224000-pixel resize, ran out of memory after minutes).
MAX_BATCH = 256
MAX_IMGSZ = 1024
MIN_CROP_PCT = 0.25  # the resize before the crop is at most 4x the input size
# torch 2.13's dynamo exporter writes opset 18 whatever lower opset is asked for (its version converter
# fails inside a warning); 18..23 were each checked to come out as asked (ONNX Runtime 1.31 runs them).
MIN_OPSET, MAX_OPSET = 18, 23


# Targets whose INT8 the search (fnexport/int8_search.py) drives: they take calibration options and float layers.
INT8_SEARCH_TARGETS = ("onnx", "onnx-arm", "openvino", "tensorrt")

# Why the maxima exist, added to pydantic's "less than or equal to N" message.
BOUNDS = {
    "batch": "a static batch is exported and parity runs it on this machine; bounded so it fits in memory",
    "imgsz": "bounded so parity images fit in memory",
    "crop_pct": f"the image is resized to imgsz/crop_pct before the crop, at most {1 / MIN_CROP_PCT:g}x the input",
    "batches": "bench batch sizes are bounded so the inputs fit in memory",
}


def torch_version() -> str:
    return importlib.metadata.version("torch").split("+")[0]


def _tuple(value: Any) -> Any:
    """YAML and JSON give lists; strict validation wants the tuple the field is (items stay strict)."""
    return tuple(value) if isinstance(value, list) else value


class _Strict(BaseModel):
    # strict: "64", 2.0 or "yes" are never coerced into an int or a bool; no inf or nan anywhere.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Floats3 = Annotated[tuple[float, float, float], BeforeValidator(_tuple)]


class PreprocessSpec(_Strict):
    mean: Floats3 = IMAGENET_MEAN
    std: Floats3 = IMAGENET_STD
    crop_pct: float = Field(0.9, ge=MIN_CROP_PCT, le=1.0)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    # Backbones only (data.RESIZE_RULES); unset: letterbox for backbones, the center crop for classifiers.
    resize: Literal["letterbox", "stretch", "none"] | None = None

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError("every std must be > 0")
        return v


class Tolerance(_Strict):
    """Parity thresholds; unset fields take the precision's default (see parity.DEFAULTS)."""

    atol: float | None = Field(None, gt=0)
    min_cosine: float | None = Field(None, ge=-1, le=1)
    min_top1: float | None = Field(None, ge=0, le=1)
    # Max abs logit error in units of the reference logits' RMS: the one check that still sees a wrong
    # logit scale, which cosine and top-1 cannot (5x logits keep both; a 1-class head has nothing else).
    max_abs_rms: float | None = Field(None, gt=0)
    # Backbones: max abs error of each output over that output's largest reference magnitude.
    max_rel: float | None = Field(None, gt=0)


class BenchSpec(_Strict):
    batches: Annotated[tuple[Annotated[int, Field(ge=1, le=MAX_BATCH)], ...], BeforeValidator(_tuple)] = Field(
        (1, 16), min_length=1
    )
    seconds: float = Field(4.0, gt=0)
    threads: int | None = Field(None, ge=1)


# Targets whose artifacts take more than one height and width (--dynamic-hw); Core ML's are the enumerated
# sizes of hw_profile, the others any size (TensorRT's within that profile).
DYNAMIC_HW_TARGETS = ("onnx", "openvino", "tensorrt", "onnx-arm", "coreml")
# Targets whose dynamic height/width is bounded by --profile-hw: TensorRT's optimization profile, Core ML's grid.
PROFILE_HW_TARGETS = ("tensorrt", "coreml")
# min/opt/max height and width when --profile-hw is not given: opt is the exported size, min and max a quarter
# and twice it (a detector's usual range), at least 32 and at most 4096.
HW_PROFILE_RANGE = (0.25, 2.0)
Size = Annotated[int, Field(ge=32, le=MAX_IMGSZ)]


def _size_or_pair(value: Any) -> Any:
    """imgsz is one size or [height, width]; anything else is one clear error (not pydantic's per-union-member list).
    Each size is then bounded like a single one, with the same message."""
    value = _tuple(value)
    sizes = value if isinstance(value, tuple) else (value,)
    if len(sizes) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        raise ValueError(f"give one size or [height, width] (got {value!r}, a {type(value).__name__})")
    for v in sizes:
        if v < 32:
            raise ValueError("Input should be greater than or equal to 32")
        if v > MAX_IMGSZ:
            raise ValueError(f"Input should be less than or equal to {MAX_IMGSZ} ({BOUNDS['imgsz']})")
    return value


class Recipe(_Strict):
    target: str
    description: str = ""
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    # One number (square) or [height, width] (backbones); a square pair is kept as one number.
    imgsz: Annotated[int | tuple[int, int], BeforeValidator(_size_or_pair)] = 224
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    dynamic: bool = False
    # Backbones: height and width dynamic (the exported size is where parity runs, and TensorRT's opt).
    dynamic_hw: bool = False
    # TensorRT with dynamic_hw: min, opt, max of both height and width in the optimization profile.
    profile_hw: Annotated[tuple[Size, Size, Size], BeforeValidator(_tuple)] | None = None
    opset: int = 20
    preprocess: PreprocessSpec = PreprocessSpec()
    calib: str | None = None
    calib_samples: int = Field(300, ge=1)
    # minmax unless given: a method given here or by --calib-method is pinned, and the INT8 search keeps it.
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # INT8 on onnx, onnx-arm and openvino: try calibration settings, then float layers, until the gate passes
    # (fnexport/int8_search.py); "off" quantizes once with the recipe's settings.
    int8_search: Literal["quick", "full", "off"] = "quick"
    # PyTorch module names (Conv2d/Linear, e.g. head, avgpool_pre_head.1) kept in float in an INT8 artifact.
    int8_exclude: Annotated[tuple[str, ...], BeforeValidator(_tuple)] = ()
    parity_data: str | None = None
    parity_samples: int = Field(32, ge=1)
    tolerance: Tolerance = Tolerance()
    bench: BenchSpec = BenchSpec()
    # The paper variant the recipe was written for; convert refuses a checkpoint of another one.
    variant: str | None = None
    # Core ML only: the oldest OS the package must load on (default: the oldest the precision allows).
    deployment_target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] | None = None
    # Largest absolute top-1 accuracy drop (0.01 = 1 point) INT8 may cost on the labelled calibration set.
    max_drop: float | None = Field(None, gt=0, lt=1)
    # Core ML only: "image" (preprocessing built in, apps pass pixels; default for classifiers) or "tensor" (float
    # NCHW; default for backbones, whose letterbox padding no 8-bit image holds).
    input: Literal["image", "tensor"] | None = None

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        # Stem /4 and three merging layers /2: anything else silently drops border pixels.
        for side in hw(v):
            if side % 32:
                raise ValueError(
                    f"{side} is not a multiple of 32 (FasterNet downsamples 32x); try {max(32, round(side / 32) * 32)}"
                )
        return v if isinstance(v, int) or v[0] != v[1] else v[0]

    @field_validator("profile_hw")
    @classmethod
    def _profile_hw(cls, v: tuple[int, int, int] | None, info: ValidationInfo) -> tuple[int, int, int] | None:
        if v is None:
            return v
        if info.data.get("target") not in PROFILE_HW_TARGETS or not info.data.get("dynamic_hw"):
            raise ValueError(
                "applies only to --target tensorrt or coreml with --dynamic-hw (the engine's height/width range, "
                "Core ML's enumerated sizes)"
            )
        if not v[0] <= v[1] <= v[2] or any(side % 32 for side in v):
            raise ValueError(f"{v}: need MIN <= OPT <= MAX, each a multiple of 32 (e.g. 320,640,1344)")
        size = hw(info.data["imgsz"]) if "imgsz" in info.data else ()
        if any(not v[0] <= side <= v[2] for side in size):
            # The engine's parity runs at the exported size: a profile without it fails only after the build.
            raise ValueError(f"{v} does not cover --imgsz {','.join(map(str, size))}, where parity is checked")
        return v

    @field_validator("dynamic_hw")
    @classmethod
    def _dynamic_hw_target(cls, v: bool, info: ValidationInfo) -> bool:
        target = info.data.get("target")
        if v and target not in DYNAMIC_HW_TARGETS:
            raise ValueError(
                f"--target {target} takes a fixed input size (give --imgsz H,W and convert once per size); "
                f"dynamic height/width is offered by {', '.join(DYNAMIC_HW_TARGETS)}"
            )
        return v

    @field_validator("opset")
    @classmethod
    def _opset_the_exporter_writes(cls, v: int) -> int:
        if not MIN_OPSET <= v <= MAX_OPSET:
            raise ValueError(
                f"{v} is outside {MIN_OPSET}..{MAX_OPSET}, the opsets torch {torch_version()}'s exporter writes as "
                f"asked (below {MIN_OPSET} it writes {MIN_OPSET} anyway); choose {MIN_OPSET}..{MAX_OPSET}"
            )
        return v

    @field_validator("max_drop")
    @classmethod
    def _int8_accuracy_control(cls, v: float | None, info: ValidationInfo) -> float | None:
        # OpenVINO: NNCF accuracy control; onnx, onnx-arm, tensorrt: the INT8 search's float fallback. Silently ignoring
        # it elsewhere would mislead.
        if v is not None and (
            info.data.get("precision") != "int8" or info.data.get("target") not in ("openvino", *INT8_SEARCH_TARGETS)
        ):
            raise ValueError(
                "applies only to --precision int8 with --target openvino (NNCF accuracy control), onnx, onnx-arm or tensorrt"
            )
        return v

    @field_validator("int8_exclude")
    @classmethod
    def _int8_exclusions(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if v and (info.data.get("precision") != "int8" or info.data.get("target") not in INT8_SEARCH_TARGETS):
            raise ValueError(f"applies only to --precision int8 with --target {', '.join(INT8_SEARCH_TARGETS)}")
        if any(not name for name in v) or len(set(v)) != len(v):
            raise ValueError("give distinct module names, e.g. head,avgpool_pre_head.1")
        return v

    @property
    def calib_method_pinned(self) -> bool:
        """The calibration method was asked for (flag or recipe key), so the INT8 search does not vary it."""
        return "calib_method" in self.model_fields_set

    @field_validator("input")
    @classmethod
    def _image_input(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v == "image" and info.data.get("target") != "coreml":
            raise ValueError("image inputs are a Core ML feature (--target coreml); other targets take a float tensor")
        return v

    @model_validator(mode="after")
    def _coreml_deployment_target(self) -> Recipe:
        if self.deployment_target is None:
            return self
        if self.target != "coreml":
            raise ValueError("deployment_target applies only to --target coreml")
        if self.precision == "int4" and self.deployment_target not in ("iOS18", "macOS15"):
            raise ValueError(
                f"Core ML int4 weights need iOS18/macOS15; {self.deployment_target} lacks them (use int8 or palettize4)"
            )
        return self

    @model_validator(mode="after")
    def _ncnn_has_no_int8_tools(self) -> Recipe:
        # Before the calibration check below: no calibration set would help.
        if (self.target, self.precision) == ("ncnn", "int8"):
            raise ValueError(
                "--target ncnn offers fp32 and fp16 only: ncnn's INT8 tools (ncnn2table, ncnn2int8) are not in "
                "the ncnn or pnnx wheels. Convert to fp32 here, then run those tools from an ncnn source build "
                "(tools/quantize) on the .param/.bin; or use --target executorch --precision int8 for phones"
            )
        return self

    @model_validator(mode="after")
    def _tensorrt_int8_opset(self) -> Recipe:
        # The INT8 graph's float part is FP16 (as NVIDIA ModelOpt makes it), and QuantizeLinear takes FP16
        # inputs and scales from opset 19; TensorRT's parser table (targets/tensorrt_qdq.py) ends at 20.
        if (self.target, self.precision) == ("tensorrt", "int8") and self.opset < 19:
            raise ValueError(
                f"--opset {self.opset}: --target tensorrt --precision int8 needs opset 19 or 20 (its FP16 part "
                "carries FP16 Q/DQ scales, which ONNX allows from opset 19); drop --opset for the default 20"
            )
        return self

    @model_validator(mode="after")
    def _dynamic_or_fixed_batch(self) -> Recipe:
        # A dynamic artifact takes any batch, so a batch size beside it describes nothing real, except for
        # OpenVINO, which compiles a dynamic model for batches of that size (THROUGHPUT; details.performance_hint).
        if self.dynamic and self.batch != 1 and self.target != "openvino":
            raise ValueError(
                f"dynamic and batch {self.batch} conflict: a dynamic artifact takes any batch (only --target openvino "
                "tunes it for a batch size); drop batch, or dynamic for a fixed batch"
            )
        return self

    @model_validator(mode="after")
    def _int8_needs_data(self) -> Recipe:
        # Calibration data decides INT8 accuracy; choosing a set for the user would hide that choice.
        if self.precision == "int8" and self.target != "coreml" and not self.calib:
            raise ValueError("int8 needs calibration images: set calib (--calib DIR, or embedded:natural)")
        return self

    @property
    def hw(self) -> tuple[int, int]:
        return hw(self.imgsz)

    def hw_profile(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(min, opt, max) for height and for width: --profile-hw for both when given, else around the exported size."""
        if self.profile_hw is not None:
            return tuple(self.profile_hw), tuple(self.profile_hw)  # type: ignore[return-value]
        low, high = HW_PROFILE_RANGE
        h, w = ((max(32, int(s * low) // 32 * 32), s, min(4096, max(s, int(s * high) // 32 * 32))) for s in self.hw)
        return h, w

    def pre(self) -> Preprocess:
        p = self.preprocess
        return Preprocess(self.imgsz, p.mean, p.std, p.crop_pct, p.interpolation, p.resize or "crop")

    def fit(self, cfg: FasterNetConfig) -> Recipe:
        """The recipe for this model: backbones get their resize rule (letterbox unless set); the backbone-only
        settings are refused for classifiers, whose center crop and pooled head want one square size."""
        if cfg.features:
            if self.max_drop is not None:
                raise BadInput(
                    "--max-drop: a top-1 accuracy bound; a backbone has no classes (the parity gate applies)"
                )
            if self.preprocess.resize is None:
                return self.model_copy(
                    update={"preprocess": self.preprocess.model_copy(update={"resize": "letterbox"})}
                )
            return self
        for flag, given in (
            (f"--imgsz {self.hw[0]},{self.hw[1]}", not isinstance(self.imgsz, int)),
            ("--dynamic-hw", self.dynamic_hw),
            (f"--resize {self.preprocess.resize}", self.preprocess.resize is not None),
        ):
            if given:
                raise BadInput(
                    f"{flag}: for backbones only; this checkpoint is a classifier (square --imgsz, center crop). "
                    "To export its four stage outputs instead, add --features"
                )
        return self


# Built-in recipes: the repository's recipes/ folder in a checkout or editable install; a wheel carries
# the same files as data-files (pyproject.toml) under <prefix>/share/fnexport/recipes.
SOURCE_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
INSTALLED_RECIPES = Path(sysconfig.get_path("data")) / "share" / "fnexport" / "recipes"


def builtin_recipes() -> dict[str, Path]:
    folder = SOURCE_RECIPES if SOURCE_RECIPES.is_dir() else INSTALLED_RECIPES
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error (YAML lets the last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(f"{key}: given twice (lines {lines[key]} and {line}); keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


# PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; with strict types that would be refused, so the
# loader reads YAML 1.2 floats too. Resolvers are per class: this copy leaves yaml.SafeLoader as it was.
_UniqueKeyLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def recipe_data(spec: str | Path) -> tuple[Path, dict]:
    """The raw mapping of a recipe file (a path, or the name of a built-in recipe)."""
    path = Path(spec)
    if not path.is_file():
        path = builtin_recipes().get(str(spec), path)
    if not path.is_file():
        raise BadInput(f"--recipe {spec}: {what_is(path)} (give a recipe file or a name from `fnexport recipes`)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise BadInput(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read it ({err.strerror})") from None
    except _DuplicateKey as err:
        raise BadInput(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise BadInput(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a recipe is a YAML mapping of keys (target, precision, ...)")
    return path, data


def load_recipe(spec: str | Path) -> tuple[str, Recipe]:
    """A recipe file (or built-in name) validated: its name (the file's stem) and the Recipe."""
    path, data = recipe_data(spec)
    return path.stem, parse_recipe(data, str(path))


def tolerance_from_flags(**flags: float | None) -> Tolerance:
    """Parity thresholds given as flags (--atol, --min-cosine, --min-top1, --max-abs-rms); None = the default."""
    try:
        return Tolerance(**flags)
    except ValidationError as err:
        raise bad_input(err, flags=True) from None


def parse_recipe(data: dict, where: str) -> Recipe:
    """A Recipe from a mapping; the first problem becomes one line naming `where`, the key and the fix."""
    try:
        return Recipe(**data)
    except ValidationError as err:
        raise bad_input(err, f"{where}: ") from None


def build_recipe(flags: dict[str, Any], recipe: str | Path | None = None) -> Recipe:
    """A validated Recipe: a recipe file (path or built-in name) if given, then flag values (None = not given)."""
    base: dict[str, Any] = {"target": "onnx"}
    path = None
    if recipe is not None:
        path, base = recipe_data(recipe)
        parse_recipe(base, str(path))
    flags = dict(flags)
    pre = {k: flags.pop(k) for k in ("mean", "std", "crop_pct", "interpolation", "resize") if k in flags}
    tol = {k: flags.pop(k) for k in ("atol", "min_cosine", "min_top1", "max_abs_rms", "max_rel") if k in flags}
    data = {**base, **{k: v for k, v in flags.items() if v is not None}}
    given = {k for k, v in flags.items() if v is not None}
    for key, group in (("preprocess", pre), ("tolerance", tol)):
        if any(v is not None for v in group.values()):
            data[key] = {**base.get(key, {}), **{k: v for k, v in group.items() if v is not None}}
            given |= {f"{key}.{k}" for k, v in group.items() if v is not None}
    try:
        return Recipe(**data)
    except ValidationError as err:
        # Name what the user wrote: the flag, or, for a value that came from the recipe file, its key there.
        loc = ".".join(str(p) for p in err.errors()[0]["loc"][:2])
        from_file = path is not None and loc and not any(loc == g or loc.startswith(g + ".") for g in given)
        raise (bad_input(err, f"{path}: ") if from_file else bad_input(err, flags=True)) from None


# Recipe keys whose flag is not `--` + the key with dashes (convert's --samples, --data; grouped keys).
FLAGS = {"calib_samples": "--samples", "parity_data": "--data"}


def flag_for(loc: tuple) -> str:
    """The CLI flag that sets the recipe key at `loc` (preprocess.std is --std, tolerance.atol is --atol)."""
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if parts and parts[0] in ("preprocess", "tolerance") and len(parts) > 1:
        parts = parts[1:]
    key = ".".join(parts)
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def bad_input(err: ValidationError, where: str = "", flags: bool = False) -> BadInput:
    """The first validation problem as one line: the recipe key (or, for `flags`, the flag) and the fix."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    fix = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        fix = _unknown(first["loc"])
    elif first["type"] == "missing":
        fix = "required; add it"
    elif first["type"] in ("int_type", "bool_type", "string_type", "float_type", "tuple_type"):
        fix += f" (got {first['input']!r}, a {type(first['input']).__name__}; values are not converted)"
    elif first["type"] in ("less_than_equal", "greater_than_equal"):
        why = next((BOUNDS[p] for p in reversed(first["loc"]) if p in BOUNDS), None)
        fix += f" ({why})" if why else ""
    if flags:
        return BadInput(f"{where}{flag_for(first['loc'])}: {fix}" if loc else f"{where}{fix}")
    return BadInput(f"{where}{loc or '(recipe)'}: {fix}")


def _unknown(loc: tuple) -> str:
    keys = _keys(loc)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key; {hint}valid keys: {', '.join(keys)}"


def _keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)
