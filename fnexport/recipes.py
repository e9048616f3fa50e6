"""A recipe: every choice one conversion makes, validated; CLI flags build or override one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fnexport.data import IMAGENET_MEAN, IMAGENET_STD, Preprocess

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


class Recipe(_Strict):
    target: str
    precision: Literal[PRECISIONS] = "fp32"  # type: ignore[valid-type]
    imgsz: int = Field(224, ge=32)
    batch: int = Field(1, ge=1)
    dynamic: bool = False
    opset: int = Field(18, ge=13, le=23)
    preprocess: PreprocessSpec = PreprocessSpec()
    calib: str | None = None
    calib_samples: int = Field(300, ge=1)
    calib_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    parity_data: str | None = None
    parity_samples: int = Field(32, ge=1)
    tolerance: Tolerance = Tolerance()
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

    def pre(self) -> Preprocess:
        p = self.preprocess
        return Preprocess(self.imgsz, p.mean, p.std, p.crop_pct, p.interpolation)
