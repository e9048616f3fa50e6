"""Command line: parse, call, print. Errors become exit codes here and nowhere else."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

import fnexport.api as api
import fnexport.manifest as mf
from fnexport.bench import bench, check_plot, plot, tabulate_speed
from fnexport.console import log, setup_logging
from fnexport.data import DEFAULT_DATA, make_calibration, resolve
from fnexport.demo import run_demo
from fnexport.doctor import doctor
from fnexport.engine import build_engine_dir
from fnexport.errors import BackendUnavailable, BadInput, CheckFailed, FnexportError
from fnexport.gate import all_passed, check_report, tabulate_parity, write_report
from fnexport.inspection import inspect
from fnexport.manifest import atomic_dir, check_out
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import build_recipe, builtin_recipes, load_recipe, recipe_data, tolerance_from_flags
from fnexport.release import release
from fnexport.targets.tensorrt import EngineOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert FasterNet checkpoints to verified deployment artifacts.",
)

Ckpt = Annotated[
    str,
    typer.Argument(
        help="Checkpoint file (.pth/.pt/.ckpt) or a variant name (fasternet_t0 ... fasternet_l) for random weights."
    ),
]
Act = Annotated[str | None, typer.Option(help="Activation, gelu or relu; needed only for non-paper widths.")]
Unsafe = Annotated[
    bool,
    typer.Option(
        "--unsafe-load", help="Allow unpickling Python objects (runs code from the file). Only for files you trust."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False) -> None:
    setup_logging(verbose)


def _floats3(text: str | None, flag: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise BadInput(f"{flag} {text!r}: give three comma-separated numbers, e.g. {flag} 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(n.strip() for n in text.split(","))


def _imgsz(text: str | None, flag: str = "--imgsz") -> int | tuple[int, int] | None:
    """--imgsz 224 (square) or --imgsz H,W (backbones); the recipe checks the values."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise BadInput(f"{flag} {text!r}: give one size (square) or HEIGHT,WIDTH, e.g. {flag} 224 or {flag} 640,960")
    return values[0] if len(values) == 1 else values  # type: ignore[return-value]


def _ints3(text: str | None, flag: str, example: str) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise BadInput(f"{flag} {text!r}: give MIN,OPT,MAX, e.g. {flag} {example}")
    return values  # type: ignore[return-value]


Features = Annotated[
    bool,
    typer.Option("--features", help="Treat a classifier as a backbone: its four stage outputs, no head."),
]


class StdoutFailed(Exception):
    """stdout cannot be written (redirected to a full disk, /dev/full, a closed pipe)."""


def _print(text: str) -> None:
    """Machine output on stdout; a failed write is the user's redirection, told apart from a bug."""
    try:
        typer.echo(text)
    except OSError as err:
        raise StdoutFailed(err) from None


def _emit(obj: Any, as_json: bool, text: str) -> None:
    _print(json.dumps(obj, indent=2, default=str) if as_json else text)


@app.command("convert")
def convert_command(
    ckpt: Ckpt,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="onnx (default), openvino, tensorrt, coreml, onnx-arm, executorch, ncnn."),
    ] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", "-p", help="fp32 (default), fp16, bf16, int8 ... as the target offers.")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Recipe YAML file or built-in recipe name; flags override its values.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (default exports/NAME-TARGET-PRECISION).")
    ] = None,
    imgsz: Annotated[
        str | None, typer.Option(help="Input size, a multiple of 32 (default 224); H,W for backbones.")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Static batch size (default 1).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch dimension.")] = False,
    dynamic_hw: Annotated[
        bool,
        typer.Option(
            "--dynamic-hw",
            help="Backbones: dynamic height and width (onnx, openvino, tensorrt, onnx-arm; coreml: enumerated sizes).",
        ),
    ] = False,
    profile_hw: Annotated[
        str | None,
        typer.Option(
            help="--dynamic-hw: MIN,OPT,MAX height and width (tensorrt: engine profile; coreml: the sizes enumerated)."
        ),
    ] = None,
    resize: Annotated[
        str | None, typer.Option(help="Backbones: letterbox (default), stretch or none, for --data and --calib images.")
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset (default 20: GELU as one op, which ONNX Runtime runs fused).")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="Normalisation mean R,G,B (default ImageNet).")] = None,
    std: Annotated[str | None, typer.Option(help="Normalisation std R,G,B (default ImageNet).")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="Center-crop ratio (default 0.9).")] = None,
    interpolation: Annotated[str | None, typer.Option(help="bicubic, bilinear, nearest or lanczos.")] = None,
    calib: Annotated[
        str | None, typer.Option(help="Calibration image folder (or embedded:natural / embedded:digits).")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Calibration images to use (default 300).")] = None,
    calib_method: Annotated[
        str | None,
        typer.Option(help="INT8 calibration: minmax, entropy or percentile; pins it (default: the search picks)."),
    ] = None,
    int8_search: Annotated[
        str | None,
        typer.Option(
            help="INT8: quick (default), full or off: try settings, then float layers, until the gate passes."
        ),
    ] = None,
    int8_exclude: Annotated[
        str | None, typer.Option(help="INT8: PyTorch module names kept in float, e.g. head,avgpool_pre_head.1.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Images for the convert-time parity check (default embedded:natural).")
    ] = None,
    atol: Annotated[float | None, typer.Option(help="Max abs logit error allowed (FP32 default 1e-3).")] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="int8 (onnx, onnx-arm, openvino, tensorrt): max top-1 drop (0.01 = 1 point), labelled --calib."
        ),
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="coreml: image (preprocessing built in; default for classifiers) or tensor (default for backbones).",
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Class names file, one per line or a JSON list (overrides the checkpoint's).")
    ] = None,
    features: Features = False,
    act: Act = None,
    unsafe_load: Unsafe = False,
    as_json: Json = False,
) -> None:
    """Convert a checkpoint into a target artifact plus manifest.json, verified against PyTorch."""
    out_dir = api.convert(
        ckpt, target, precision, out, recipe=recipe, imgsz=_imgsz(imgsz), batch=batch, dynamic=dynamic or None,
        dynamic_hw=dynamic_hw or None, profile_hw=_ints3(profile_hw, "--profile-hw", "320,640,1344"), resize=resize,
        opset=opset, mean=_floats3(mean, "--mean"), std=_floats3(std, "--std"), crop_pct=crop_pct,
        interpolation=interpolation, calib=calib, samples=samples, calib_method=calib_method,
        int8_search=int8_search, int8_exclude=_names(int8_exclude), data=data,
        atol=atol, max_drop=max_drop, input=input_, labels=labels, features=features, act=act,
        unsafe_load=unsafe_load,
    )  # fmt: skip
    manifest = mf.read(out_dir, verify=False)
    _emit(manifest | {"out": str(out_dir)}, as_json, str(out_dir / manifest["artifact"]))


@app.command("inspect")
def inspect_command(
    ckpt: Ckpt,
    imgsz: Annotated[str, typer.Option(help="Input size for the MAC count (H,W for backbones).")] = "224",
    graph: Annotated[
        bool, typer.Option("--graph", help="Also export and count ONNX ops (plain export vs fnexport).")
    ] = False,
    features: Features = False,
    act: Act = None,
    unsafe_load: Unsafe = False,
    as_json: Json = False,
) -> None:
    """Show what a checkpoint is: kind, variant, shape, params, MACs, and what reparameterization removes."""
    # The same --imgsz checks as convert (multiples of 32; H,W for backbones only): the size itself before
    # the checkpoint is read, whether it fits the model's kind after.
    recipe = build_recipe({"imgsz": _imgsz(imgsz)})
    loaded = load_checkpoint(ckpt, act=act, unsafe_load=unsafe_load, features=features)
    size = recipe.fit(loaded.config).imgsz
    info = inspect(loaded, size, graph)
    if as_json:
        _emit(info, True, "")
        return
    shown = "x".join(map(str, info["imgsz"])) if isinstance(info["imgsz"], list) else info["imgsz"]
    what = f"classes {info['num_classes']}" if info["kind"] == "classifier" else "backbone"
    lines = [
        f"{info['variant']} {info['kind']}: embed_dim {info['embed_dim']}, depths {info['depths']}, "
        f"act {info['act']}, n_div {info['n_div']}, {what}",
        f"params {info['params'] / 1e6:.3f}M, MACs at {shown}: {info['macs'] / 1e9:.4f}G",
        f"source: {info['source']['layout']}",
    ]
    for out in info.get("outputs", []):
        lines.append(f"output {out['name']}: {out['channels']} channels, stride {out['stride']}, {out['shape']}")
    for kind, counts in [("modules", info["modules"])] + ([("onnx ops", info["onnx_ops"])] if graph else []):
        before, after = counts.values()
        lines.append(f"{kind} (before -> after reparameterization):")
        for name in sorted(set(before) | set(after), key=lambda n: -before.get(n, after.get(n, 0))):
            lines.append(f"  {name:24s} {before.get(name, 0):5d} -> {after.get(name, 0):5d}")
    _print("\n".join(lines))


@app.command("doctor")
def doctor_command(
    require: Annotated[
        str | None, typer.Option(help="Comma-separated backends that must be usable (exit 3 otherwise).")
    ] = None,
    as_json: Json = False,
) -> None:
    """List backends: installed or not, version, and why one cannot run here."""
    rows = doctor()
    needed = [n for n in (require or "").split(",") if n]
    unknown = [n for n in needed if n not in {r["backend"] for r in rows}]
    if unknown:
        raise BadInput(f"--require: unknown backend(s) {', '.join(unknown)}")
    text = "\n".join(
        f"{r['backend']:12s} {'ok' if r['usable'] else ('limited' if r['installed'] else 'missing'):8s} "
        f"{r['version'] or '-':14s} {r['note']}"
        for r in rows
    )
    _emit(rows, as_json, text)
    missing = [r["backend"] for r in rows if r["backend"] in needed and not r["usable"]]
    if missing:
        raise BackendUnavailable(f"required backend(s) not usable here: {', '.join(missing)}")


@app.command("build-engine")
def build_engine_command(
    folder: Annotated[Path, typer.Argument(help="A directory written by `fnexport convert --target tensorrt`.")],
    workspace: Annotated[float, typer.Option(help="Builder workspace limit, GiB.")] = 4.0,
    opt_level: Annotated[int, typer.Option(help="Builder optimization level 0-5 (TensorRT default 3).")] = 3,
    version_compatible: Annotated[
        bool, typer.Option("--version-compatible", help="Engine loads on newer TensorRT (same major; 10 on 11).")
    ] = False,
    hardware_compat: Annotated[
        str, typer.Option(help="none, ampere+ (any sm 8.0+ GPU) or same-cc (same compute capability, TensorRT 10.9+).")
    ] = "none",
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file, read and updated (default: fnexport's cache).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="MIN,OPT,MAX batch for a --dynamic engine (default 1,16,64).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Build the TensorRT engine of a prepared directory on this GPU, check its parity, update manifest.json."""
    sizes = None
    if profile is not None:
        try:
            sizes = tuple(int(v) for v in profile.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 3:
            raise BadInput(f"--profile {profile!r}: give MIN,OPT,MAX batch sizes, e.g. --profile 1,16,64")
    opts = EngineOptions(workspace, opt_level, version_compatible, hardware_compat, timing_cache, sizes)
    manifest = build_engine_dir(folder, opts)
    _emit(manifest, as_json, str(folder / manifest["artifact"]))


@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where the demo writes its checkpoint and artifacts.")
    ] = Path("fnexport-demo"),
    steps: Annotated[int, typer.Option(help="Training steps (batch 64).")] = 150,
    as_json: Json = False,
) -> None:
    """Train a FasterNet-T0 on the digits bundled with scikit-learn, convert it to every installed target, check parity."""
    result = run_demo(out, steps)
    _emit(result, as_json, result["table"])


@app.command("bench")
def bench_command(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Checkpoints, variant names (random weights) or artifact directories from `convert`."),
    ],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes: latency at 1, throughput above.")] = "1,16",
    threads: Annotated[int | None, typer.Option(help="Threads for every backend (default: all cores).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per configuration first (at most ~1 s).")] = 3,
    iters: Annotated[int | None, typer.Option(help="Timed calls per configuration (instead of --seconds).")] = None,
    seconds: Annotated[float | None, typer.Option(help="Timed seconds per configuration (default 4).")] = None,
    imgsz: Annotated[int, typer.Option(help="Input size for checkpoints (artifacts keep their own).")] = 224,
    plot_path: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a latency vs accuracy (or MACs) chart; needs the bench extra (matplotlib)."),
    ] = None,
    act: Act = None,
    unsafe_load: Unsafe = False,
    as_json: Json = False,
) -> None:
    """Latency, throughput, achieved GFLOPS and speedup vs PyTorch eager, interleaved in one run."""
    try:
        batches = tuple(int(b) for b in batch.split(","))
    except ValueError:
        raise BadInput(f"--batch {batch!r}: give comma-separated integers, e.g. --batch 1,8,32") from None
    if plot_path:
        check_plot(plot_path)  # before minutes of timing, not after
    result = bench(inputs, batches, threads, warmup, iters, seconds, imgsz, act, unsafe_load)
    _emit(result, as_json, tabulate_speed(result))  # the timings first: a failing plot never loses them
    if plot_path:
        plot(result, plot_path)


@app.command("parity")
def parity_command(
    ckpt: Ckpt,
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories written by `fnexport convert`.")],
    data: Annotated[
        str | None, typer.Option(help="Image folder (ImageFolder layout adds accuracy); default embedded:natural.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Images to compare on (seeded sample).")] = 200,
    report: Annotated[list[Path] | None, typer.Option(help="Write the report: .json or .md (repeatable).")] = None,
    atol: Annotated[float | None, typer.Option(help="Max abs logit error (overrides the precision default).")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Min per-image cosine similarity of the logits.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Min top-1 agreement with PyTorch, 0..1.")] = None,
    max_abs_rms: Annotated[
        float | None, typer.Option(help="Max abs logit error over the RMS of PyTorch's logits (reduced precisions).")
    ] = None,
    allow_not_run: Annotated[
        bool, typer.Option("--allow-not-run", help="Pass artifacts whose runtime is missing here (reported NOT RUN).")
    ] = False,
    localize: Annotated[
        bool, typer.Option("--localize", help="For a failing ONNX artifact, name the first diverging layer.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    imgsz: Annotated[
        str | None,
        typer.Option(help="Check --dynamic-hw backbone artifacts at this size (H,W) instead of their exported one."),
    ] = None,
    act: Act = None,
    unsafe_load: Unsafe = False,
    as_json: Json = False,
) -> None:
    """Release gate: every artifact against the original PyTorch model on the same inputs; exit 1 on drift."""
    tolerance_from_flags(atol=atol, min_cosine=min_cosine, min_top1=min_top1, max_abs_rms=max_abs_rms)
    api.check_count(samples, "--samples", "images")
    if threads is not None:
        api.check_count(threads, "--threads", "threads")
    for path in report or []:
        check_report(path)  # before the gate runs: a bad --report must not cost the whole run
    results = api.parity(
        ckpt, artifacts, data, samples, atol=atol, min_cosine=min_cosine, min_top1=min_top1,
        max_abs_rms=max_abs_rms, localize=localize, threads=threads, imgsz=_imgsz(imgsz), act=act,
        unsafe_load=unsafe_load,
    )  # fmt: skip
    table = tabulate_parity(results, data or DEFAULT_DATA)
    for path in report or []:
        write_report(path, results, table)
    _emit([r.to_dict() for r in results], as_json, table)  # stdout: results only; progress went to stderr
    if not all_passed(results, allow_not_run):
        bad = [f"{r.dir} ({r.status}: {r.reason})" for r in results if r.status != "PASS"]
        raise CheckFailed("parity gate failed: " + "; ".join(bad))


@app.command("predict")
def predict_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory written by `fnexport convert`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files and folders (searched recursively).")],
    top: Annotated[int, typer.Option(help="Classes to show per image.")] = 5,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    as_json: Json = False,
) -> None:
    """Run an artifact on images from its manifest alone (no checkpoint): top classes with probabilities."""
    api.check_count(top, "--top", "classes")
    with api.load(artifact, threads) as art:
        results = api.predict(art, images, top)
        if not as_json:
            for row in results:
                _print(f"{row['file']}: {_describe(row)}")
            return
        # Streamed: one image's result at a time, so a folder of any size prints in flat memory.
        first = next(results)  # BadInput (exit 2) before anything is printed when no image is readable
        _print('{"predictions": [\n  ' + json.dumps(first))
        for row in results:
            _print("  ," + json.dumps(row))
        _print("]}")


def _describe(row: dict) -> str:
    if "top" in row:
        return ", ".join(
            f"{t['label'] if t['label'] is not None else '#' + str(t['index'])} {t['score']:.4f}" for t in row["top"]
        )
    return "; ".join(
        f"{o['name']} {o['shape']} mean {o['mean']:.4g} std {o['std']:.4g} min {o['min']:.4g} max {o['max']:.4g}"
        for o in row["outputs"]
    )


@app.command("val")
def val_command(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories written by `fnexport convert`.")],
    data: Annotated[str, typer.Option(help="Labelled ImageFolder tree: one folder per class, named as the labels.")],
    samples: Annotated[int | None, typer.Option(help="Images to score (seeded sample; default all).")] = None,
    report: Annotated[list[Path] | None, typer.Option(help="Write the results: .json or .md (repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads.")] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help="Images per call (default: a fixed-batch artifact's own, which is the only one it takes; else 32)."
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Top-1/top-5 accuracy of artifacts on a labelled folder, no checkpoint needed; streamed in flat memory."""
    for path in report or []:
        api.check_val_report(path)  # before the run: a bad --report must not cost it
    results = api.val(artifacts, data, samples, batch=batch, threads=threads)
    table = api.tabulate_val(results, data)
    for path in report or []:
        api.write_val_report(path, results, table)
    _emit(results[0] if len(results) == 1 else results, as_json, table)


@app.command("calib")
def calib_command(
    source: Annotated[
        str, typer.Argument(help="An ImageFolder tree to sample from, or embedded:natural / embedded:digits.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the calibration set into.")],
    per_class: Annotated[int | None, typer.Option(help="Images per class folder (stratified).")] = None,
    samples: Annotated[int | None, typer.Option(help="Images in total (when not per class).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Build a calibration folder: a seeded, stratified sample of your images, or an embedded set."""
    check_out(out, replace=False)
    folder = resolve(source)
    # Built in a hidden sibling and renamed into place: Ctrl-C leaves nothing, so a rerun starts clean.
    with atomic_dir(out, check=lambda path: check_out(path, replace=False)) as tmp:
        n = make_calibration(folder, tmp, per_class, samples, seed)
    log.info("Wrote %d images to %s", n, out)
    _print(str(out))


@app.command("recipes")
def recipes_command() -> None:
    """List the built-in recipes with their one-line descriptions."""
    for name, path in builtin_recipes().items():
        _print(f"{name:40s} {recipe_data(path)[1].get('description', '')}")


@app.command("release")
def release_command(
    ckpt: Ckpt,
    recipe: Annotated[list[str], typer.Option(help="Recipe file or built-in name (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Release directory.")],
    allow_not_run: Annotated[
        bool, typer.Option("--allow-not-run", help="Ship artifacts whose runtime is missing here (NOT RUN).")
    ] = False,
    timed: Annotated[
        bool, typer.Option("--bench", help="Then time the shipped artifacts with the recipes' bench settings.")
    ] = False,
    act: Act = None,
    unsafe_load: Unsafe = False,
    as_json: Json = False,
) -> None:
    """Convert every recipe, gate each with parity, write the bundle and summary.json/.md; exit 1 if any gate fails."""
    loaded_recipes = [load_recipe(spec) for spec in recipe]
    names = [n for n, _ in loaded_recipes]
    if len(set(names)) != len(names):
        raise BadInput(f"--recipe: the same recipe name appears twice ({', '.join(names)})")
    summary = release(
        load_checkpoint(ckpt, act=act, unsafe_load=unsafe_load), loaded_recipes, out, allow_not_run, timed
    )
    _emit(summary, as_json, str(out / "summary.md"))
    if not summary["passed"]:
        failed = [r["recipe"] for r in summary["artifacts"] if r["status"] != "PASS"]
        raise CheckFailed(f"release gate failed for: {', '.join(failed)} (see {out / 'summary.md'})")


class Interrupted(SystemExit):
    """Ctrl-C (SIGINT) or SIGTERM: unwinds like an exception (temp dirs are removed on the way out).

    A SystemExit, not a KeyboardInterrupt: typer turns KeyboardInterrupt into a silent exit 130 before main()
    could say what happened."""


def _terminated(signum: int, frame: object) -> None:
    raise Interrupted(128 + signum)


def main() -> None:
    # CI cancellations and `docker stop` send SIGTERM, whose default action skips every cleanup.
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run() -> None:
    try:
        # Not standalone: click would draw its usage box for a bad option value; we print one line.
        code = app(standalone_mode=False)
    # typer 0.29 vendors click as typer._click and exports no UsageError of its own.
    except typer._click.exceptions.UsageError as err:
        if message := err.format_message().rstrip("."):  # empty: no arguments at all, help already shown
            where = f"; see '{err.ctx.command_path} --help'" if err.ctx else ""
            typer.echo(f"error: {message}{where}", err=True)
        raise SystemExit(2) from None
    except typer.Abort:  # Ctrl-C at a prompt or while click parses
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except Interrupted as err:
        typer.echo("interrupted", err=True)
        raise SystemExit(err.code) from None
    except StdoutFailed as failed:
        (err,) = failed.args
        # What is still buffered (and Python's own flush at exit) goes nowhere instead of failing again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if err.errno == errno.EPIPE:  # `fnexport ... | head`: the reader left; nothing to report
            raise SystemExit(141) from None
        typer.echo(f"error: cannot write to stdout ({err.strerror}); redirect it somewhere writable", err=True)
        raise SystemExit(2) from None
    except FnexportError as err:
        if type(err) is FnexportError:
            traceback.print_exc()
            typer.echo("fnexport hit an internal error; please report it with the traceback above.", err=True)
        else:
            typer.echo(f"error: {err}", err=True)
        raise SystemExit(err.exit_code) from None
    except Exception:
        traceback.print_exc()
        typer.echo("fnexport hit an internal error; please report it with the traceback above.", err=True)
        raise SystemExit(4) from None
    if isinstance(code, int):  # typer.Exit(n) and --help come back as an exit code when not standalone
        raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
