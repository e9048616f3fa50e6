"""The main job: checkpoint -> reparameterized model -> target artifact -> parity -> manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import fnexport.int8_search as int8_search
import fnexport.manifest as mf
from fnexport.comparison import (
    FeatureReport,
    ParityReport,
    check,
    check_features,
    feature_reference,
    reference,
    tolerance_for,
)
from fnexport.console import log, step
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, FnexportError
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import count, hw
from fnexport.recipes import Recipe
from fnexport.targets import get_target
from fnexport.targets.base import Exported, Source, Target
from fnexport.targets.graph import onnx_opset

REPARAM_ATOL = 1e-4
# Targets that ship backbones (several named outputs); the others refuse one before any work.
BACKBONE_TARGETS = ("onnx", "openvino", "tensorrt", "onnx-arm", "executorch", "ncnn", "coreml")


@dataclass
class Converted:
    """A finished output directory, the parity report behind it, and what could not be done here."""

    out: Path
    manifest: dict
    report: (
        ParityReport | FeatureReport | None
    )  # None: the artifact's runtime is missing here (manifest["parity"]["reason"])
    unfinished: str | None = None  # the hand-off line when the target needs another machine to finish


def default_out(ckpt: Checkpoint, recipe: Recipe) -> Path:
    return Path("exports") / f"{ckpt.name}-{recipe.target}-{recipe.precision}"


def convert(ckpt: Checkpoint, recipe: Recipe, out: Path | None = None) -> tuple[Path, dict]:
    """Write the artifact and manifest into `out` atomically; CheckFailed if parity fails, BackendUnavailable
    (after writing) when the target must be finished on another machine."""
    done = convert_checkpoint(ckpt, recipe, out)
    if done.unfinished:
        raise BackendUnavailable(done.unfinished)
    return done.out, done.manifest


def convert_checkpoint(ckpt: Checkpoint, recipe: Recipe, out: Path | None = None) -> Converted:
    """Export, check parity and write the manifest; nothing is written when a check fails."""
    recipe = recipe.fit(ckpt.config)
    target = target_for(ckpt, recipe)
    out = out or default_out(ckpt, recipe)
    mf.check_out(out)  # before the parity data is loaded and run: a bad --out fails in a moment
    with Source(ckpt, recipe) as src:
        if recipe.precision == "int8":
            int8_search.check_request(src)  # --int8-exclude names, --max-drop's labels: before any long work
        src.reference()  # the parity images and their logits, before the export: bad --data fails early
        with mf.atomic_dir(out) as tmp:
            reparam_err = check_reparam(src)
            searched = None
            if int8_search.applies(src, target):
                with step(f"Searching {target.name} int8 settings ({recipe.int8_search})"):
                    exported, searched = int8_search.search(src, target, recipe, tmp)
            else:
                with step(f"Exporting {target.name} {recipe.precision}"):
                    exported = target.export(src, tmp, recipe)
            manifest = build_manifest(ckpt, recipe, target, exported)
            if searched is not None:
                manifest["int8"] = searched
            record_inputs(src, exported, manifest)
            manifest["parity"] = {
                "reference": "PyTorch eager FP32, the model as loaded (BatchNorm not folded)",
                "data": src.parity_inputs().source,
                "reparam_max_abs": reparam_err,
            }
            report = check_parity(src, target, exported, manifest)
            # Everything in the folder now is fnexport's: a later convert may replace these names and no others.
            manifest["files"] = sorted(p.name for p in tmp.iterdir())
            mf.write(tmp, manifest)
            if report is not None and not report.passed:
                raise CheckFailed(
                    f"{target.name} {recipe.precision} parity failed: {'; '.join(report.failures)} (nothing written to {out})"
                )
    log.info("Wrote %s", out)
    unfinished = exported.unfinished.replace("{dir}", str(out)) if exported.unfinished else None
    return Converted(out, manifest, report, unfinished)


def target_for(ckpt: Checkpoint, recipe: Recipe) -> Target:
    """The recipe's target, once its precision and variant are known to fit this checkpoint."""
    target = get_target(recipe.target)
    if ckpt.config.features and target.name not in BACKBONE_TARGETS:
        raise BadInput(
            f"--target {target.name}: {ckpt.path} is a backbone (four feature maps), which this target does not ship "
            f"yet; use {', '.join(BACKBONE_TARGETS)}"
        )
    if recipe.precision not in target.precisions:
        raise BadInput(
            f"--precision {recipe.precision} is not offered by --target {target.name} (choose: {', '.join(target.precisions)})"
        )
    if recipe.variant and recipe.variant != ckpt.config.variant:
        raise BadInput(
            f"{ckpt.path}: is a {ckpt.config.variant}, but the recipe is for {recipe.variant}; use a {ckpt.config.variant} recipe"
        )
    return target


# Fewer calibration images than this give INT8 ranges that rarely hold on other inputs.
MIN_CALIBRATION = 32


def record_inputs(src: Source, exported: Exported, manifest: dict) -> None:
    """Record what the artifact was made from, not what was asked for: the ONNX opset read from the file,
    and the calibration images only when the target used them (warning about a tiny set)."""
    onnx_file = exported.path if exported.path.suffix == ".onnx" else src.onnx_file
    manifest["onnx_opset"] = onnx_opset(onnx_file) if onnx_file else None
    if manifest["onnx_opset"] not in (None, src.recipe.opset):
        raise FnexportError(
            f"the exporter wrote opset {manifest['onnx_opset']}, not {src.recipe.opset}; please report this"
        )
    calib = src.calibration_set
    if calib is None:
        if src.recipe.calib:
            log.warning(
                "--calib %s was not used: %s %s does not calibrate; it is not recorded in the manifest",
                src.recipe.calib,
                manifest["target"],
                manifest["precision"],
            )
        manifest["recipe"]["calib"] = None
        return
    manifest["calibration"] = {"data": calib.source, "images": len(calib.x), "skipped": len(calib.skipped)}
    if len(calib.x) < MIN_CALIBRATION:
        warning = (
            f"calibrated on {len(calib.x)} image(s): INT8 ranges from fewer than {MIN_CALIBRATION} rarely hold on "
            "other inputs; calibrate on 100+ representative images (fnexport calib)"
        )
        log.warning("%s", warning)
        manifest["calibration"]["warning"] = warning


def check_reparam(src: Source) -> float:
    """The folded model must match the original to float rounding before anything is exported."""
    ref = src.reference()
    x = src.parity_inputs().x
    if src.ckpt.config.features:
        # Each feature map against its own range (their scales differ by stage).
        pairs = list(zip(feature_reference(src.module("split_cat"), x), ref, strict=True))
    else:
        pairs = [(reference(src.module("split_cat"), x), ref)]
    errs = [(float(np.abs(out - r).max()), max(1.0, float(np.abs(r).max()))) for out, r in pairs]
    err = max(e for e, _ in errs)
    log.info("Reparameterized model vs original: max abs error %.2e", err)
    if any(e > REPARAM_ATOL * scale for e, scale in errs):
        raise CheckFailed(
            f"BatchNorm folding changed the outputs by {err:.3g} (> {REPARAM_ATOL:g}); please report this"
        )
    return err


def check_parity(
    src: Source, target: Target, exported: Exported, manifest: dict
) -> ParityReport | FeatureReport | None:
    """Run the artifact on the parity images against the original model; record the outcome in the manifest."""
    recipe = src.recipe
    try:
        runner = target.runner(exported.path, manifest)
    except BackendUnavailable as err:
        # e.g. Core ML off macOS: the artifact is written, and `fnexport parity` reports NOT RUN.
        log.warning("Parity not run for %s: %s", target.name, err)
        manifest["parity"] |= {"ran": False, "reason": str(err)}
        return None
    x = src.parity_inputs().x
    cfg = src.ckpt.config
    tol = tolerance_for(recipe.precision, recipe.tolerance, backbone=cfg.features)
    with step(f"Checking parity on {len(x)} images"):
        if cfg.features:
            report = check_features(runner, x, src.reference(), tol, [o["name"] for o in cfg.outputs()])
        else:
            report = check(runner, x, src.reference(), tol, src.labels())
    manifest["parity"] |= report.to_dict()
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.failures)
    log.info("Parity %s %s vs PyTorch: %s -> %s", target.name, recipe.precision, report.summary(), verdict)
    return report


def build_manifest(ckpt: Checkpoint, recipe: Recipe, target: Target, exported: Exported) -> dict:
    """What the artifact is. A backbone also records its four outputs (name, channels, stride), the detector's
    resize rule, the exported size (where parity ran and MACs are counted) and, with --dynamic-hw, symbolic
    height and width."""
    cfg = ckpt.config
    params, macs = count(ckpt.model, recipe.imgsz)
    p = recipe.preprocess
    batch = "batch" if recipe.dynamic else recipe.batch
    h, w = hw(recipe.imgsz)
    dims = ["height", "width"] if recipe.dynamic_hw else [h, w]
    spec: dict = {"name": "input", "shape": [batch, cfg.in_chans, *dims]}
    if cfg.features:
        spec |= {"size": [h, w], "dynamic_hw": recipe.dynamic_hw}
    spec |= {"dtype": "float32", "layout": "NCHW, RGB"}
    if cfg.features:
        spec["resize"] = p.resize
    spec |= {"mean": list(p.mean), "std": list(p.std), "crop_pct": p.crop_pct, "interpolation": p.interpolation}
    if cfg.features:
        out = {"outputs": [o | {"shape": [batch, o["channels"], *(_strided(d, o["stride"]) for d in dims)]}
                           for o in cfg.outputs()]}  # fmt: skip
    else:
        out = {"output": {"name": "logits", "shape": [batch, cfg.num_classes]}}
    return {
        "schema": mf.SCHEMA,
        "kind": "backbone" if cfg.features else "classifier",
        "target": target.name,
        "precision": recipe.precision,
        "artifact": exported.path.name,
        "sha256": mf.sha256_artifact(exported.path),
        "input": spec,
        **out,
        "model": cfg.to_dict() | {"params": params, "macs": macs},  # MACs at input.size
        "labels": None if cfg.features else ckpt.labels,
        "source": ckpt.source(),
        "recipe": recipe.model_dump(mode="json"),
        "details": exported.details,
        "versions": mf.versions(*target.packages),
    }


def _strided(dim: int | str, stride: int) -> int | str:
    """An output's height or width: the input's divided by the stride, symbolically for --dynamic-hw."""
    return f"{dim}/{stride}" if isinstance(dim, str) else dim // stride
