"""The release gate: every artifact directory against the original PyTorch model on the same inputs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import fnexport.manifest as mf
from fnexport.comparison import (
    FeatureReport,
    FeatureStats,
    ParityReport,
    ParityStats,
    feature_reference,
    label_map,
    localize,
    reference,
    run,
    run_features,
    tolerance_for,
)
from fnexport.console import log, progress, step
from fnexport.data import DEFAULT_DATA, PARITY_SEED, ImageStream, Preprocess, open_images
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, what_is
from fnexport.model.checkpoint import Checkpoint, as_features
from fnexport.recipes import Tolerance
from fnexport.targets import get_target


@dataclass
class ArtifactResult:
    """One artifact's verdict in a gate run: PASS, FAIL or NOT RUN (with the reason)."""

    dir: str
    target: str
    precision: str
    status: str
    report: ParityReport | FeatureReport | None = None  # FeatureReport: a backbone, judged output by output
    reason: str = ""
    localized: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["report"] = self.report.to_dict() if self.report is not None else None  # a failed report is falsy
        return d


def gate(
    ckpt: Checkpoint,
    dirs: list,
    data: str | None = None,
    samples: int = 200,
    override: Tolerance | None = None,
    localize_failures: bool = False,
    threads: int | None = None,
    imgsz: tuple[int, int] | None = None,
) -> list[ArtifactResult]:
    """Verify every artifact's hash first, then run each against the original model on the same inputs.

    The images stream from disk in batches, once per preprocessing: each batch goes through the original
    model once and through every artifact that shares that preprocessing, so memory does not grow with
    --samples (all of a group's runtimes are open at once instead). `imgsz` (height, width; the caller checked
    it with check_size) checks --dynamic-hw backbone artifacts at that size instead of the one they were exported at."""
    verified = read_verified(map(Path, dirs))
    groups: dict[Preprocess, list[int]] = {}
    for i, (d, manifest) in enumerate(verified):
        if manifest["source"].get("sha256") and ckpt.sha256 and manifest["source"]["sha256"] != ckpt.sha256:
            log.warning("%s was converted from %s, not from %s: expect drift", d, manifest["source"]["path"], ckpt.path)
        groups.setdefault(preprocess_of(manifest, imgsz), []).append(i)
    results: dict[int, ArtifactResult] = {}
    for pre, members in groups.items():
        stream = open_images(data or DEFAULT_DATA, pre, samples, seed=PARITY_SEED)
        group = [verified[i] for i in members]
        results |= zip(members, check_group(ckpt, group, stream, override, localize_failures, threads), strict=True)
    return [results[i] for i in range(len(verified))]


@dataclass
class _Live:
    """One artifact being checked: its runner and what has been accumulated so far."""

    dir: Path
    manifest: dict
    tol: Tolerance
    runner: object
    stats: ParityStats | FeatureStats = dataclasses.field(default_factory=ParityStats)
    seconds: float = 0.0


def check_group(
    ckpt: Checkpoint,
    group: list[tuple[Path, dict]],
    stream: ImageStream,
    override: Tolerance | None,
    localize_failures: bool,
    threads: int | None,
) -> list[ArtifactResult]:
    """Stream `stream` once through the original model and every artifact of `group` (same preprocessing),
    judge each by its recipe's thresholds (then `override`), localize failures on the first batch."""
    results: dict[Path, ArtifactResult] = {}
    live: list[_Live] = []
    # A group shares its preprocessing, and backbones (letterbox, stretch, none) never share a classifier's crop.
    backbone = group[0][1].get("kind") == "backbone"
    ckpt = model_for(ckpt, group[0][0], backbone)
    names = [o["name"] for o in ckpt.config.outputs()] if backbone else []
    for d, manifest in group:
        target = get_target(manifest["target"])
        precision = manifest["precision"]
        recipe_tol = Tolerance(**manifest.get("recipe", {}).get("tolerance", {}))
        tol = tolerance_for(precision, recipe_tol, override, backbone=backbone)
        try:
            runner = target.runner(d / manifest["artifact"], manifest, threads)
        except BackendUnavailable as err:
            results[d] = ArtifactResult(str(d), target.name, precision, "NOT RUN", reason=str(err))
            continue
        live.append(_Live(d, manifest, tol, runner, FeatureStats(names) if backbone else ParityStats()))
    to_model = None if backbone else label_map(ckpt.labels, ckpt.config.num_classes, stream.classes, stream.source)
    first = None  # the first batch, kept for --localize
    try:
        if live:
            names = ", ".join(f"{a.manifest['target']} {a.manifest['precision']}" for a in live)
            size = max([BATCH, *(a.runner.batch or 0 for a in live)])
            with progress(f"Parity of {names} on {stream.source}", stream.count) as advance:
                skipped = 0
                for x, y, _ in stream.batches(size):
                    first = x if first is None and localize_failures else first
                    ref = (feature_reference if backbone else reference)(ckpt.model, x)
                    labels = None if to_model is None or y is None else to_model[y]
                    for a in live:
                        start = time.perf_counter()
                        out = (run_features if backbone else run)(a.runner, x)
                        a.seconds += time.perf_counter() - start
                        if backbone:
                            a.stats.add(ref, out)
                        else:
                            a.stats.add(ref, out, labels)
                    advance(len(x) + len(stream.skipped) - skipped)
                    skipped = len(stream.skipped)
    finally:
        for a in live:
            a.runner.close()
    for a in live:
        results[a.dir] = judge(ckpt, a, first, localize_failures)
    return [results[d] for d, _ in group]


def model_for(ckpt: Checkpoint, d: Path, backbone: bool) -> Checkpoint:
    """The checkpoint as the artifacts were made from it: a backbone artifact made with --features is compared
    with the classifier's stages; a classifier artifact cannot be compared with a backbone checkpoint."""
    if backbone and not ckpt.config.features:
        log.info("%s is a backbone: comparing with the four stage outputs of %s (as --features did)", d, ckpt.path)
        return as_features(ckpt)
    if not backbone and ckpt.config.features:
        raise BadInput(f"{d}: a classifier artifact, but {ckpt.path} is a backbone checkpoint (no head to compare)")
    return ckpt


BATCH = 32  # images per streamed batch (more when an artifact's fixed batch is larger)


def judge(ckpt: Checkpoint, a: _Live, first: np.ndarray | None, localize_failures: bool) -> ArtifactResult:
    """One artifact's verdict from its accumulated figures; on failure, localize the drift on `first`."""
    report = a.stats.report(a.tol)
    report.ran = dict(a.runner.info)
    target, precision = a.manifest["target"], a.manifest["precision"]
    log.info(
        "%s %s (%s): %d images, %.1f s in its runtime (%.0f images/s)",
        target, precision, a.dir, report.n, a.seconds, report.n / max(a.seconds, 1e-9),
    )  # fmt: skip
    result = ArtifactResult(
        str(a.dir), target, precision, "PASS" if report else "FAIL", report, "; ".join(report.failures)
    )
    artifact = a.dir / a.manifest["artifact"]
    if not report and localize_failures and first is not None:
        if artifact.suffix == ".onnx":
            with step(f"Localizing the drift in {artifact}"):
                result.localized = localize(ckpt.model, artifact, first[: a.runner.batch or 4], precision)
        else:
            result.localized = {
                "first_divergent": None,
                "note": f"localization needs an .onnx artifact, not {artifact.suffix}",
            }
    return result


def read_verified(dirs) -> list[tuple[Path, dict]]:
    """Every directory's manifest, after checking every artifact's sha256: one bad file stops the whole gate."""
    manifests, bad = [], []
    for d in dirs:
        try:
            manifests.append((d, mf.read(d, verify=True)))
        except CheckFailed as err:
            bad.append(str(err))
    if bad:
        raise CheckFailed("integrity check failed, nothing was run: " + "; ".join(bad))
    return manifests


def check_size(imgsz: tuple[int, int], manifests: list[tuple[Path, dict]]) -> None:
    """parity --imgsz H,W (a size recipes accept): only artifacts that take that height and width."""
    for d, manifest in manifests:
        if not manifest["input"].get("dynamic_hw"):
            raise BadInput(
                f"--imgsz {imgsz[0]},{imgsz[1]}: {d} takes only the size it was exported at; --imgsz checks "
                "backbone artifacts converted with --dynamic-hw (leave it out for this one)"
            )
        sizes = manifest.get("details", {}).get("enumerated_hw")  # Core ML: only the sizes it enumerates
        if sizes and list(imgsz) not in sizes:
            raise BadInput(
                f"--imgsz {imgsz[0]},{imgsz[1]}: {d} takes only the sizes it enumerates; choose one of "
                + " ".join(f"{h},{w}" for h, w in sizes)
            )


def preprocess_of(manifest: dict, imgsz: tuple[int, int] | None = None) -> Preprocess:
    """The artifact's preprocessing at its exported size, or at `imgsz` (a --dynamic-hw backbone: check_size)."""
    spec = manifest["input"]
    if manifest.get("kind") == "backbone":  # the exported size (a dynamic H x W artifact's shape says height, width)
        h, w = imgsz or spec["size"]
        size = h if h == w else (h, w)
        return Preprocess(
            size, tuple(spec["mean"]), tuple(spec["std"]), spec["crop_pct"], spec["interpolation"], spec["resize"]
        )
    return Preprocess(
        spec["shape"][2], tuple(spec["mean"]), tuple(spec["std"]), spec["crop_pct"], spec["interpolation"]
    )


def all_passed(results: list[ArtifactResult], allow_not_run: bool = False) -> bool:
    return all(r.status == "PASS" or (allow_not_run and r.status == "NOT RUN") for r in results)


def tabulate_parity(results: list[ArtifactResult], data: str) -> str:
    """A Markdown table for CI job summaries."""
    lines = [
        f"{MD_TITLE} (original model, BatchNorm unfolded) on {data}",
        "",
        "| artifact | target | precision | status | images | max abs | mean abs | max rel | abs/RMS | cosine | top-1 | top-5 | accuracy (ref) | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p = r.report
        if isinstance(p, FeatureReport):  # a backbone: one row per output, classifier-only figures omitted
            lines += feature_rows(r, p)
            continue
        if p is None:
            cells = ["-"] * 9
        else:
            acc = "-" if p.accuracy is None else f"{p.accuracy:.2%} ({p.ref_accuracy:.2%})"
            cells = [
                str(p.n),
                f"{p.max_abs:.2e}",
                f"{p.mean_abs:.2e}",
                f"{p.max_rel:.2e}",
                f"{p.max_abs_rms:.2e}",
                f"{p.cosine:.6f}",
                "n/a" if p.top1 is None else f"{p.top1:.2%}",
                "n/a" if p.top5 is None else f"{p.top5:.2%}",
                acc,
            ]
        reason = r.reason
        if r.localized and r.localized.get("first_divergent"):
            first = r.localized["first_divergent"]
            reason += f"; first divergent layer: {first['module']} (rel error {first['rel_error']:.2e})"
        lines.append(f"| {r.dir} | {r.target} | {r.precision} | {r.status} | " + " | ".join(cells) + f" | {reason} |")
    return "\n".join(lines) + "\n"


def feature_rows(r: ArtifactResult, p: FeatureReport) -> list[str]:
    """A backbone artifact's table rows: its overall verdict, then each output's figures and verdict."""
    rows = [f"| {r.dir} | {r.target} | {r.precision} | {r.status} | {p.n} |" + " - |" * 8 + f" {r.reason} |"]
    for o in p.outputs:
        cells = [f"{o.max_abs:.2e}", f"{o.mean_abs:.2e}", f"{o.max_rel:.2e}", "-", f"{o.cosine:.6f}", "-", "-", "-"]
        status = "PASS" if o.passed else "FAIL"
        rows.append(
            f"| {r.dir} {o.name} | {r.target} | {r.precision} | {status} | {p.n} | "
            + " | ".join(cells)
            + f" | {'; '.join(o.failures)} |"
        )
    if r.localized and r.localized.get("first_divergent"):
        first = r.localized["first_divergent"]
        rows[0] = rows[0][:-2] + f"; first divergent layer: {first['module']} (rel error {first['rel_error']:.2e}) |"
    return rows


REPORT_SUFFIXES = (".json", ".md")
MD_TITLE = "Parity against PyTorch"


def check_report(path: Path, ours: Callable[[Path], bool] | None = None, kind: str = "parity report") -> None:
    """Before the gate runs: --report names a .json/.md file in an existing folder, new or an earlier report
    (of this `kind`, recognised by `ours`, default a parity report).

    Never anything else: not a manifest.json, an artifact or a user's notes that happen to share the name."""
    if path.suffix not in REPORT_SUFFIXES:
        raise BadInput(f"--report {path}: use a .json or .md file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"--report {path}: its folder {parent}: {what_is(parent)}; create it first")
    if path.is_dir():
        raise BadInput(f"--report {path}: is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise BadInput(f"--report {path}: {what_is(path)}")
        if not (ours or is_report)(path):
            raise BadInput(f"--report {path}: exists and is not an fnexport {kind}; choose a new file name")


def is_report(path: Path) -> bool:
    """An earlier `fnexport parity --report` file: a JSON list of artifact results, or the Markdown table."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".md":
        return text.startswith(MD_TITLE)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    fields = {f.name for f in dataclasses.fields(ArtifactResult)}
    return isinstance(data, list) and all(isinstance(r, dict) and fields <= r.keys() for r in data)


def write_report(path: Path, results: list[ArtifactResult], table: str) -> None:
    """The report as JSON or Markdown, whole or not at all."""
    text = json.dumps([r.to_dict() for r in results], indent=2) + "\n" if path.suffix == ".json" else table
    mf.write_text(path, text)
