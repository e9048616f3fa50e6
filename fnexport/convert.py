"""The main job: checkpoint -> reparameterized model -> target artifact -> parity -> manifest."""

from __future__ import annotations

import platform
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fnexport import manifest as mf
from fnexport.console import log, step
from fnexport.data import ImageSet, load_images
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.model.checkpoint import Checkpoint
from fnexport.model.fasternet import count
from fnexport.model.reparam import reparameterize
from fnexport.parity import ParityReport, compare, labels_for, reference, run, tolerance_for
from fnexport.recipes import Recipe
from fnexport.targets import DEFAULT_DATA, Source, get_target

REPARAM_ATOL = 1e-4


def default_out(ckpt: Checkpoint, recipe: Recipe) -> Path:
    return Path("exports") / f"{ckpt.name}-{recipe.target}-{recipe.precision}"


def convert(ckpt: Checkpoint, recipe: Recipe, out: Path | None = None) -> tuple[Path, dict]:
    """Write the artifact and manifest into `out` atomically; raise CheckFailed if parity fails."""
    target = get_target(recipe.target)
    if recipe.precision not in target.precisions:
        raise BadInput(
            f"--precision {recipe.precision} is not offered by --target {target.name} (choose: {', '.join(target.precisions)})"
        )
    if recipe.variant and recipe.variant != ckpt.config.variant:
        raise BadInput(
            f"{ckpt.path}: is a {ckpt.config.variant}, but the recipe is for {recipe.variant}; use a {ckpt.config.variant} recipe"
        )
    out = out or default_out(ckpt, recipe)
    mf.check_out(out)  # before the parity data is loaded and run: a bad --out fails in a moment
    data = parity_inputs(ckpt, recipe)
    ref = reference(ckpt.model, data.x)
    with mf.atomic_dir(out) as tmp:
        src = Source(ckpt, recipe)
        try:
            reparam_err = check_reparam(src, data.x, ref)
            with step(f"Exporting {target.name} {recipe.precision}"):
                exported = target.export(src, tmp, recipe)
        finally:
            shutil.rmtree(src.workdir, ignore_errors=True)
        manifest = build_manifest(ckpt, recipe, target, exported)
        manifest["parity"] = {
            "reference": "PyTorch eager FP32, the model as loaded (BatchNorm not folded)",
            "data": data.source,
            "reparam_max_abs": reparam_err,
        }
        try:
            runner = target.runner(exported.path, manifest)
        except BackendUnavailable as err:
            # e.g. Core ML off macOS: the artifact is written, and `fnexport parity` reports NOT RUN.
            log.warning("Parity not run for %s: %s", target.name, err)
            manifest["parity"] |= {"ran": False, "reason": str(err)}
            mf.write(tmp, manifest)
            report = None
        else:
            with step(f"Checking parity on {len(data.x)} images"):
                try:
                    report = compare(
                        ref,
                        run(runner, data.x),
                        tolerance_for(recipe.precision, recipe.tolerance),
                        labels_for(ckpt.labels, ckpt.config.num_classes, data),
                    )
                    report.ran = dict(runner.info)
                finally:
                    runner.close()
            manifest["parity"] |= report.to_dict()
            mf.write(tmp, manifest)
            log_report(target.name, recipe.precision, report)
        if report is not None and not report.passed:
            raise CheckFailed(
                f"{target.name} {recipe.precision} parity failed: {'; '.join(report.failures)} (nothing written to {out})"
            )
    log.info("Wrote %s", out)
    if exported.unfinished:
        raise BackendUnavailable(exported.unfinished.replace("{dir}", str(out)))
    return out, manifest


def parity_inputs(ckpt: Checkpoint, recipe: Recipe) -> ImageSet:
    source = recipe.parity_data or DEFAULT_DATA
    return load_images(source, recipe.pre(), recipe.parity_samples, seed=1)


def check_reparam(src: Source, x: np.ndarray, ref: np.ndarray) -> float:
    """The folded model must match the original to float rounding before anything is exported."""
    folded = reference(src.module("split_cat"), x)
    err = float(np.abs(folded - ref).max())
    log.info("Reparameterized model vs original: max abs logit error %.2e", err)
    if err > REPARAM_ATOL * max(1.0, float(np.abs(ref).max())):
        raise CheckFailed(f"BatchNorm folding changed the logits by {err:.3g} (> {REPARAM_ATOL:g}); please report this")
    return err


def build_manifest(ckpt: Checkpoint, recipe: Recipe, target, exported) -> dict:
    cfg = ckpt.config
    params, macs = count(ckpt.model, recipe.imgsz)
    p = recipe.preprocess
    batch = "batch" if recipe.dynamic else recipe.batch
    return {
        "schema": mf.SCHEMA,
        "target": target.name,
        "precision": recipe.precision,
        "artifact": exported.path.name,
        "sha256": mf.sha256_artifact(exported.path),
        "input": {
            "name": "input",
            "shape": [batch, cfg.in_chans, recipe.imgsz, recipe.imgsz],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "mean": list(p.mean),
            "std": list(p.std),
            "crop_pct": p.crop_pct,
            "interpolation": p.interpolation,
        },
        "output": {"name": "logits", "shape": [batch, cfg.num_classes]},
        "model": cfg.to_dict() | {"params": params, "macs": macs},
        "labels": ckpt.labels,
        "source": ckpt.source(),
        "recipe": recipe.model_dump(mode="json"),
        "details": exported.details,
        "versions": mf.versions(*target.packages),
    }


def log_report(name: str, precision: str, report: ParityReport) -> None:
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.failures)
    log.info("Parity %s %s vs PyTorch: %s -> %s", name, precision, report.summary(), verdict)


def inspect(ckpt: Checkpoint, imgsz: int = 224, graph: bool = False) -> dict:
    """Config, size and what reparameterization changes (module counts; ONNX ops with `graph`)."""
    params, macs = count(ckpt.model, imgsz)
    folded = reparameterize(ckpt.model, "split_cat")  # not via Source: that makes a temp dir it never removes
    info = ckpt.config.to_dict() | {
        "params": params,
        "macs": macs,
        "imgsz": imgsz,
        "source": ckpt.source(),
        "labels": ckpt.labels,
        "modules": {"before": module_counts(ckpt.model), "after": module_counts(folded)},
    }
    if graph:
        info["onnx_ops"] = graph_ops(ckpt, imgsz)
    return info


def module_counts(model: torch.nn.Module) -> dict[str, int]:
    return dict(Counter(type(m).__name__ for m in model.modules() if not list(m.children())).most_common())


def graph_ops(ckpt: Checkpoint, imgsz: int) -> dict[str, dict[str, int]]:
    """ONNX ops of a plain export (official inference form, `slicing`) next to fnexport's graph."""
    import copy

    from fnexport.targets.onnx import export_plain, op_counts

    src = Source(ckpt, Recipe(target="onnx", imgsz=imgsz, dynamic=True))
    try:
        with step("Exporting the plain and the fnexport ONNX graphs"):
            plain = copy.deepcopy(ckpt.model)
            plain.set_pconv_form("slicing")
            before = op_counts(export_plain(plain, src.workdir / "plain.onnx", imgsz))
            after = op_counts(src.onnx())
    finally:
        shutil.rmtree(src.workdir, ignore_errors=True)
    return {"plain": before, "fnexport": after}


# Optional backends and the extra that installs each; `doctor` reports them without importing.
BACKENDS = {
    "torch": "core",
    "onnx": "core",
    "onnxruntime": "core",
    "onnxslim": "core",
    "onnxscript": "core",
    "openvino": "openvino",
    "nncf": "openvino",
    "tensorrt": "tensorrt",
    "coremltools": "coreml",
}


def doctor() -> list[dict]:
    """Each backend: installed, version, and why it cannot run here when it cannot."""
    import importlib.metadata

    rows = []
    for module, extra in BACKENDS.items():
        row: dict = {"backend": module, "extra": extra, "installed": importlib.util.find_spec(module) is not None}
        try:
            row["version"] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            row["version"] = None
        row["usable"] = row["installed"]
        row["note"] = "" if row["installed"] else f"pip install 'fnexport[{extra}]'"
        if module == "tensorrt" and row["installed"] and not torch.cuda.is_available():
            row["usable"], row["note"] = False, "no CUDA GPU visible: engines cannot be built or run here"
        if module == "coremltools" and row["installed"] and platform.system() != "Darwin":
            row["note"] = "converts here; Core ML prediction needs macOS"
        rows.append(row)
    return rows


def release(
    ckpt: Checkpoint, recipes: list[tuple[str, Recipe]], out: Path, allow_not_run: bool = False, bench: bool = False
) -> dict:
    """Convert every recipe into `out`, gate each with parity, mark failures, write summary.json/.md.

    With `bench`, the shipped artifacts are then timed in one interleaved `fnexport bench` run with the
    recipes' `bench:` settings (the union of their batch sizes, the longest time per row) into bench.json.
    """
    import json

    from fnexport.errors import FnexportError
    from fnexport.parity import gate, markdown

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"{out}: cannot create the release directory ({err.strerror}); choose another --out") from None
    rows, md = [], [f"# Release of {ckpt.path}", ""]
    for name, recipe in recipes:
        dest = out / name
        row: dict = {"recipe": name, "target": recipe.target, "precision": recipe.precision, "dir": str(dest)}
        try:
            convert(ckpt, recipe, dest)
        except BackendUnavailable as err:
            # The artifact may exist (TensorRT phase 1); its runtime does not, so the gate says NOT RUN.
            row["convert"] = f"incomplete: {err}"
        except (CheckFailed, BadInput) as err:
            row |= {"convert": f"failed: {err}", "status": "FAIL"}
            rows.append(row)
            md += [f"## {name}: FAIL", "", f"convert failed: {err}", ""]
            continue
        else:
            row["convert"] = "ok"
        if not (dest / mf.MANIFEST).is_file():
            row["status"] = "NOT RUN"
            rows.append(row)
            continue
        try:
            result = gate(ckpt, [dest], recipe.parity_data, recipe.parity_samples, recipe.tolerance)[0]
        except FnexportError as err:
            row |= {"status": "FAIL", "gate": str(err)}
        else:
            row |= {"status": result.status, "gate": result.to_dict()}
            md += [f"## {name}: {result.status}", "", markdown([result], recipe.parity_data or DEFAULT_DATA)]
        if row["status"] == "FAIL" or (row["status"] == "NOT RUN" and not allow_not_run):
            # A failed gate is never shipped under its own name.
            failed = dest.with_name(dest.name + ".FAILED")
            shutil.rmtree(failed, ignore_errors=True)
            dest.rename(failed)
            row["dir"] = str(failed)
        rows.append(row)
    shipped = [r for r in rows if r["status"] == "PASS" or (allow_not_run and r["status"] == "NOT RUN")]
    summary = {"checkpoint": ckpt.source(), "passed": len(shipped) == len(rows), "artifacts": rows}
    shipped_dirs = [r["dir"] for r in shipped if Path(r["dir"]).is_dir()]  # a NOT RUN may have written nothing
    if bench and shipped_dirs:
        from fnexport.bench import bench as run_bench
        from fnexport.bench import markdown as bench_markdown

        specs = [recipe.bench for _, recipe in recipes]
        result = run_bench(
            [ckpt, *shipped_dirs],
            tuple(sorted({b for spec in specs for b in spec.batches})),
            threads=next((spec.threads for spec in specs if spec.threads), None),
            seconds=max(spec.seconds for spec in specs),
            imgsz=recipes[0][1].imgsz,
        )
        (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        summary["bench"] = str(out / "bench.json")
        md += ["## Speed", "", bench_markdown(result), ""]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"| {r['recipe']} | {r['target']} | {r['precision']} | {r['status']} | {r['dir']} |" for r in rows]
    table = ["| recipe | target | precision | status | directory |", "|---|---|---|---|---|", *lines, ""]
    (out / "summary.md").write_text("\n".join(md[:2] + table + md[2:]) + "\n")
    return summary
