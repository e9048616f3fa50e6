"""The build-engine job: finish a prepared TensorRT directory on the GPU host, check the engine, update its manifest."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

import fnexport.manifest as mf
from fnexport.comparison import check, check_features, tolerance_for
from fnexport.console import log, step
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.recipes import Recipe
from fnexport.targets.base import parity_images
from fnexport.targets.tensorrt import (
    ENGINE,
    PREPARED,
    REFERENCE,
    EngineOptions,
    TensorRtRunner,
    build_engine,
    engine_hw,
    engine_unavailable,
    input_digest,
)


def build_engine_dir(folder: Path, opts: EngineOptions) -> dict:
    """Build model.engine in a prepared directory, check it against the stored reference, update the manifest."""
    manifest = mf.read(folder)
    if manifest.get("target") != "tensorrt":
        raise BadInput(f"{folder}: made for --target {manifest.get('target')}, not tensorrt")
    details = manifest["details"]
    prepared = folder / PREPARED
    if not prepared.is_file() or mf.sha256_artifact(prepared) != details["prepared"]["sha256"]:
        raise CheckFailed(f"{prepared}: missing or changed since convert wrote it; re-run fnexport convert")
    reason = engine_unavailable()
    if reason is not None:
        raise BackendUnavailable(f"cannot build the engine of {folder} here: {reason}")
    recipe = Recipe(**manifest["recipe"])
    opts = replace(opts, profile_hw=engine_hw(recipe))  # a --dynamic-hw backbone's H/W range, as convert set it
    # Convert kept the reference outputs: the GPU host needs the images, not the checkpoint. Checked before the
    # build, which takes minutes.
    data = parity_images(recipe)
    stored = np.load(folder / REFERENCE)
    if input_digest(data.x) != str(stored["input_sha256"]):
        raise BadInput(f"{data.source}: the parity images differ from the ones convert used; cannot compare here")
    labels = stored["labels"] if "labels" in stored else None
    backbone, names = manifest.get("kind") == "backbone", [o["name"] for o in mf.outputs(manifest)]
    ref = [stored[name] for name in names]
    tol = tolerance_for(recipe.precision, recipe.tolerance, backbone=backbone)
    tmp = folder / f".{ENGINE}.tmp{os.getpid()}"
    try:
        info = build_engine(prepared, tmp, manifest["input"]["shape"], manifest["precision"], opts)
        updated = manifest | {
            "artifact": ENGINE,
            "sha256": mf.sha256_artifact(tmp),
            "details": details | {"engine": info},
            "files": sorted({*manifest.get("files", [manifest["artifact"]]), ENGINE}),
        }
        with step(f"Checking engine parity on {len(data.x)} images"):
            runner = TensorRtRunner(tmp, updated)
            if backbone:  # every output, each against its own reference
                report = check_features(runner, data.x, ref, tol, names)
            else:
                report = check(runner, data.x, ref[0], tol, labels)
        log.info("Parity tensorrt %s engine vs PyTorch: %s", recipe.precision, report.summary())
        if not report.passed:
            raise CheckFailed(
                f"tensorrt {recipe.precision} engine parity failed: {'; '.join(report.failures)} (engine not kept)"
            )
        updated["parity"] = manifest["parity"] | {"data": data.source} | report.to_dict()
        updated["parity"].pop("reason", None)
        os.replace(tmp, folder / ENGINE)
    finally:
        tmp.unlink(missing_ok=True)
    mf.write(folder, updated)
    return updated
