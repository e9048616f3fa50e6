"""A recipe: every choice one conversion makes, validated; CLI flags build or override one."""

from __future__ import annotations

import difflib
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fnexport.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from fnexport.errors import BadInput

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "palettize4", "palettize8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessSpec(_Strict):
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = Field(0.9, gt=0.0, le=1.0)
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"

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


class BenchSpec(_Strict):
    batches: tuple[int, ...] = (1, 16)
    seconds: float = Field(4.0, gt=0)
    threads: int | None = Field(None, ge=1)


class Recipe(_Strict):
    target: str
    description: str = ""
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    imgsz: int = Field(224, ge=32)
    batch: int = Field(1, ge=1)
    dynamic: bool = False
    opset: int = Field(20, ge=13, le=23)
    preprocess: PreprocessSpec = PreprocessSpec()
    calib: str | None = None
    calib_samples: int = Field(300, ge=1)
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
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
    # Core ML only: "image" (default there; preprocessing built in, apps pass pixels) or "tensor" (float NCHW).
    input: Literal["image", "tensor"] | None = None

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        # Stem /4 and three merging layers /2: anything else silently drops border pixels.
        if v % 32:
            raise ValueError(
                f"{v} is not a multiple of 32 (FasterNet downsamples 32x); try {max(32, round(v / 32) * 32)}"
            )
        return v

    @field_validator("max_drop")
    @classmethod
    def _int8_accuracy_control(cls, v: float | None, info: ValidationInfo) -> float | None:
        # Only OpenVINO's NNCF accuracy control uses it; silently ignoring it elsewhere would mislead.
        if v is not None and (info.data.get("target"), info.data.get("precision")) != ("openvino", "int8"):
            raise ValueError("applies only to --target openvino --precision int8 (NNCF accuracy control)")
        return v

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
    def _int8_needs_data(self) -> Recipe:
        # Calibration data decides INT8 accuracy; choosing a set for the user would hide that choice.
        if self.precision == "int8" and self.target != "coreml" and not self.calib:
            raise ValueError("int8 needs calibration images: set calib (--calib DIR, or embedded:natural)")
        return self

    def pre(self) -> Preprocess:
        p = self.preprocess
        return Preprocess(self.imgsz, p.mean, p.std, p.crop_pct, p.interpolation)


# Built-in recipes: the repository's recipes/ folder in a checkout or editable install; a wheel carries
# the same files as data-files (pyproject.toml) under <prefix>/share/fnexport/recipes.
SOURCE_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
INSTALLED_RECIPES = Path(sysconfig.get_path("data")) / "share" / "fnexport" / "recipes"


def builtin_recipes() -> dict[str, Path]:
    folder = SOURCE_RECIPES if SOURCE_RECIPES.is_dir() else INSTALLED_RECIPES
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def recipe_data(spec: str | Path) -> tuple[Path, dict]:
    """The raw mapping of a recipe file (a path, or the name of a built-in recipe)."""
    path = Path(spec)
    if not path.is_file():
        path = builtin_recipes().get(str(spec), path)
    if not path.is_file():
        raise BadInput(f"{spec}: no such recipe file or built-in recipe (see `fnexport recipes`)")
    try:
        data = yaml.safe_load(path.read_text())
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
    """Parity thresholds given as flags (--atol, --min-cosine, --min-top1); None = the precision's default."""
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
    if recipe is not None:
        path, base = recipe_data(recipe)
        parse_recipe(base, str(path))
    flags = dict(flags)
    pre = {k: flags.pop(k) for k in ("mean", "std", "crop_pct", "interpolation") if k in flags}
    tol = {k: flags.pop(k) for k in ("atol", "min_cosine", "min_top1") if k in flags}
    data = {**base, **{k: v for k, v in flags.items() if v is not None}}
    for key, group in (("preprocess", pre), ("tolerance", tol)):
        if any(v is not None for v in group.values()):
            data[key] = {**base.get(key, {}), **{k: v for k, v in group.items() if v is not None}}
    try:
        return Recipe(**data)
    except ValidationError as err:
        raise bad_input(err, flags=True) from None


def bad_input(err: ValidationError, where: str = "", flags: bool = False) -> BadInput:
    """The first validation problem as one line: the recipe key (or, for `flags`, the flag) and the fix."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    fix = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        fix = _unknown(first["loc"])
    elif first["type"] == "missing":
        fix = "required; add it"
    if flags:
        return BadInput(f"{where}--{loc.replace('_', '-')}: {fix}" if loc else f"{where}{fix}")
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
