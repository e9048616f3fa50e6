"""A release: every recipe converted and gated into one folder, failures marked, summary.json/.md beside them."""

from __future__ import annotations

import json
from pathlib import Path

import fnexport.manifest as mf
from fnexport.bench import bench, tabulate_speed
from fnexport.conversion import Converted, convert_checkpoint, target_for
from fnexport.data import DEFAULT_DATA
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.gate import ArtifactResult, tabulate_parity
from fnexport.model.checkpoint import Checkpoint
from fnexport.recipes import Recipe

SUMMARY_JSON = "summary.json"
FAILED = ".FAILED"  # suffix of an artifact folder whose gate failed: written, never shipped under its own name


def release(
    ckpt: Checkpoint,
    recipes: list[tuple[str, Recipe]],
    out: Path,
    allow_not_run: bool = False,
    timed: bool = False,
) -> dict:
    """Convert every recipe into `out`, gate each with parity, mark failures, write summary.json/.md.

    With `timed`, the shipped artifacts are then timed in one interleaved `fnexport bench` run with the
    recipes' `bench:` settings (the union of their batch sizes, the longest time per row) into bench.json.
    """
    for _, recipe in recipes:  # a recipe for another variant or an unoffered precision: bad input, before any work
        target_for(ckpt, recipe)
    check_release_out(out, [name for name, _ in recipes])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"{out}: cannot create the release directory ({err.strerror}); choose another --out") from None
    rows, sections = [], []
    for name, recipe in recipes:
        row, section = ship(ckpt, name, recipe, out / name, allow_not_run)
        rows.append(row)
        sections += section
    shipped = [r for r in rows if r["status"] == "PASS" or (allow_not_run and r["status"] == "NOT RUN")]
    summary = {"checkpoint": ckpt.source(), "passed": len(shipped) == len(rows), "artifacts": rows}
    shipped_dirs = [r["dir"] for r in shipped if Path(r["dir"]).is_dir()]  # a NOT RUN may have written nothing
    if timed and shipped_dirs:
        summary["bench"] = str(out / "bench.json")
        sections += ["## Speed", "", time_shipped(ckpt, recipes, shipped_dirs, out / "bench.json"), ""]
    write_summary(out, ckpt, summary, sections)
    return summary


def ship(ckpt: Checkpoint, name: str, recipe: Recipe, dest: Path, allow_not_run: bool) -> tuple[dict, list[str]]:
    """Convert one recipe into `dest` and judge it; a failed gate is never shipped under its own name."""
    row: dict = {"recipe": name, "target": recipe.target, "precision": recipe.precision, "dir": str(dest)}
    failed = dest.with_name(dest.name + FAILED)
    try:
        done = convert_checkpoint(ckpt, recipe, dest)
    except (BackendUnavailable, CheckFailed, BadInput) as err:
        # Nothing was made: an earlier release's NAME or NAME.FAILED would now sit beside a row that says otherwise.
        mf.remove_output(dest)
        mf.remove_output(failed)
        if isinstance(err, BackendUnavailable):  # the backend is not installed here
            return row | {"convert": f"incomplete: {err}", "status": "NOT RUN"}, []
        return row | {"convert": f"failed: {err}", "status": "FAIL"}, [
            f"## {name}: FAIL",
            "",
            f"convert failed: {err}",
            "",
        ]
    # The artifact may be written but unfinished (TensorRT phase 1); its runtime is missing, so the gate says NOT RUN.
    row["convert"] = f"incomplete: {done.unfinished}" if done.unfinished else "ok"
    result = gate_result(done)
    row |= {"status": result.status, "gate": result.to_dict()}
    mf.remove_output(failed)  # a stale NAME.FAILED never stays beside this run's NAME, nor under it
    if result.status == "FAIL" or (result.status == "NOT RUN" and not allow_not_run):
        dest.rename(failed)
        row["dir"] = str(failed)
    return row, [f"## {name}: {result.status}", "", tabulate_parity([result], recipe.parity_data or DEFAULT_DATA)]


def gate_result(done: Converted) -> ArtifactResult:
    """The gate's verdict from the parity check convert just ran on the recipe's own images and thresholds."""
    m = done.manifest
    if done.report is None:
        return ArtifactResult(str(done.out), m["target"], m["precision"], "NOT RUN", reason=m["parity"]["reason"])
    status = "PASS" if done.report else "FAIL"
    return ArtifactResult(
        str(done.out), m["target"], m["precision"], status, done.report, "; ".join(done.report.failures)
    )


def time_shipped(ckpt: Checkpoint, recipes: list[tuple[str, Recipe]], dirs: list[str], path: Path) -> str:
    """One interleaved bench of the shipped artifacts beside PyTorch with the recipes' settings; its Markdown."""
    specs = [recipe.bench for _, recipe in recipes]
    result = bench(
        [ckpt, *dirs],
        tuple(sorted({b for spec in specs for b in spec.batches})),
        threads=next((spec.threads for spec in specs if spec.threads), None),
        seconds=max(spec.seconds for spec in specs),
        imgsz=recipes[0][1].imgsz,
    )
    mf.write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    return tabulate_speed(result)


def write_summary(out: Path, ckpt: Checkpoint, summary: dict, sections: list[str]) -> None:
    mf.write_text(out / SUMMARY_JSON, json.dumps(summary, indent=2, default=str) + "\n")
    rows = summary["artifacts"]
    lines = [f"| {r['recipe']} | {r['target']} | {r['precision']} | {r['status']} | {r['dir']} |" for r in rows]
    table = ["| recipe | target | precision | status | directory |", "|---|---|---|---|---|", *lines, ""]
    mf.write_text(out / "summary.md", "\n".join([f"# Release of {ckpt.path}", "", *table, *sections]) + "\n")


def check_release_out(out: Path, names: list[str]) -> None:
    """Before any work: `out` is new, empty, or an earlier release holding only what fnexport wrote there.

    A release writes summary.json/.md and bench.json beside one output folder per recipe; an earlier release is
    known by its summary.json. Any other file (a user's own summary.md, notes) stops it: nothing is overwritten."""
    out = mf.resolved(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is a file; choose a directory path with --out")
    if not out.is_dir() or not any(out.iterdir()):
        mf.check_out(out)  # a parent that is a file, a symlink loop
        return
    ours = {SUMMARY_JSON, "summary.md", "bench.json"} if _is_summary(out / SUMMARY_JSON) else set()
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in ours:
            continue
        if entry.is_dir() and (entry / mf.MANIFEST).is_file():
            mf.check_replaceable(entry)  # an fnexport output holding only its own files (user notes inside stop it)
            continue
        foreign.append(entry.name)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadInput(
            f"{out}: holds files fnexport did not write ({shown}); a release would overwrite or mix with them, "
            "so move them out or choose a new --out"
        )
    for name in names:  # this run replaces these names; an earlier file of the same name must be fnexport's too
        for path in (out / name, out / (name + FAILED)):
            if path.exists() and not path.is_dir():
                raise BadInput(f"{path}: exists and is a file; a release writes a folder there")


def _is_summary(path: Path) -> bool:
    """An earlier release's summary.json (its shape: checkpoint, passed, artifacts)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"checkpoint", "passed", "artifacts"} <= data.keys()
