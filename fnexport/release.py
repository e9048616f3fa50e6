"""A release: every recipe converted and gated into one folder, failures marked, summary.json/.md beside them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fnexport.bench import bench, tabulate_speed
from fnexport.conversion import Converted, convert_checkpoint
from fnexport.data import DEFAULT_DATA
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed
from fnexport.gate import ArtifactResult, tabulate_parity
from fnexport.model.checkpoint import Checkpoint
from fnexport.recipes import Recipe


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
    try:
        done = convert_checkpoint(ckpt, recipe, dest)
    except BackendUnavailable as err:  # the backend is not installed here: nothing was made
        return row | {"convert": f"incomplete: {err}", "status": "NOT RUN"}, []
    except (CheckFailed, BadInput) as err:
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
    if result.status == "FAIL" or (result.status == "NOT RUN" and not allow_not_run):
        failed = dest.with_name(dest.name + ".FAILED")
        shutil.rmtree(failed, ignore_errors=True)
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
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return tabulate_speed(result)


def write_summary(out: Path, ckpt: Checkpoint, summary: dict, sections: list[str]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rows = summary["artifacts"]
    lines = [f"| {r['recipe']} | {r['target']} | {r['precision']} | {r['status']} | {r['dir']} |" for r in rows]
    table = ["| recipe | target | precision | status | directory |", "|---|---|---|---|---|", *lines, ""]
    (out / "summary.md").write_text("\n".join([f"# Release of {ckpt.path}", "", *table, *sections]) + "\n")
