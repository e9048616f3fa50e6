"""The Python API: convert, load an artifact and run it, parity, val. The CLI is a thin layer over these.

Every function raises fnexport.errors' typed exceptions (BadInput, CheckFailed, BackendUnavailable) and
never exits the process.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import nn

import fnexport.manifest as mf
from fnexport.comparison import run_features
from fnexport.console import log, progress
from fnexport.conversion import convert as convert_checkpoint
from fnexport.data import IMAGE_SUFFIXES, ImageStream, Preprocess, list_images, open_images
from fnexport.errors import BadInput
from fnexport.gate import ArtifactResult, check_report, check_size, gate, preprocess_of
from fnexport.model.checkpoint import Checkpoint, as_features, from_module, load_checkpoint
from fnexport.recipes import MAX_BATCH, build_recipe, tolerance_from_flags
from fnexport.targets import get_target

__all__ = ["Artifact", "convert", "load", "parity"]

ModelLike = str | Path | nn.Module
ImageLike = str | Path | Image.Image
# Images per runtime call for a dynamic-batch artifact when no batch is asked for.
DEFAULT_BATCH = 32
# Exceptions PIL raises for a file that is not a readable image (a DecompressionBombError for a fuzzed header).
IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


def checkpoint(
    model: ModelLike | Checkpoint, act: str | None = None, unsafe_load: bool = False, features: bool = False
) -> Checkpoint:
    """A checkpoint file, a variant name (random weights) or a FasterNet nn.Module, loaded as a Checkpoint;
    `features`: a classifier as a backbone (its four stage outputs)."""
    if isinstance(model, Checkpoint):
        return as_features(model) if features else model
    if isinstance(model, nn.Module):
        ckpt = from_module(model, act)
        return as_features(ckpt) if features else ckpt
    if isinstance(model, (str, Path)):
        return load_checkpoint(model, act=act, unsafe_load=unsafe_load, features=features)
    raise BadInput(
        f"model: give a checkpoint path, a variant name or a FasterNet nn.Module, not a {type(model).__name__}"
    )


def read_labels(labels: str | Path | Sequence[str], num_classes: int) -> list[str]:
    """Class names: a list, or a file (one per line, or a JSON list); exactly one distinct name per model output."""
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise BadInput(f"--labels {path}: cannot read it ({err})") from None
        try:
            names = (
                json.loads(text) if text.lstrip().startswith("[") else [ln.strip() for ln in text.strip().splitlines()]
            )
        except json.JSONDecodeError as err:
            raise BadInput(f"--labels {path}: not a JSON list ({err})") from None
        where = f"--labels {path}"
    else:
        names, where = list(labels), "labels"
    if len(names) != num_classes or not all(isinstance(n, str) and n for n in names):
        raise BadInput(f"{where}: {len(names)} names for {num_classes} classes; give one non-empty name each")
    if len(set(names)) != len(names):
        raise BadInput(f"{where}: a name appears twice; every class needs its own name")
    return names


def convert(
    model: ModelLike,
    target: str | None = None,
    precision: str | None = None,
    out: str | Path | None = None,
    *,
    recipe: str | Path | None = None,
    imgsz: int | tuple[int, int] | None = None,
    batch: int | None = None,
    dynamic: bool | None = None,
    dynamic_hw: bool | None = None,
    profile_hw: tuple[int, int, int] | None = None,
    resize: str | None = None,
    opset: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    calib: str | Path | None = None,
    samples: int | None = None,
    calib_method: str | None = None,
    int8_search: str | None = None,
    int8_exclude: Sequence[str] | None = None,
    data: str | Path | None = None,
    atol: float | None = None,
    max_drop: float | None = None,
    input: str | None = None,
    labels: str | Path | Sequence[str] | None = None,
    features: bool = False,
    act: str | None = None,
    unsafe_load: bool = False,
) -> Path:
    """Convert `model` (checkpoint path, variant name or FasterNet nn.Module) and return the output directory.

    target and precision default to onnx and fp32 (or the recipe's); the keyword options are `fnexport convert`'s
    flags. Raises CheckFailed when parity fails (nothing written), BackendUnavailable when the runtime is missing.
    """
    # Options are validated before the checkpoint is read: a typo costs a moment, not a load.
    rec = build_recipe(
        dict(
            target=target, precision=precision, imgsz=imgsz, batch=batch, dynamic=dynamic or None, opset=opset,
            dynamic_hw=dynamic_hw or None, profile_hw=profile_hw, resize=resize,
            mean=_floats3(mean), std=_floats3(std), crop_pct=crop_pct, interpolation=interpolation,
            calib=None if calib is None else str(calib), calib_samples=samples, calib_method=calib_method,
            int8_search=int8_search, int8_exclude=None if int8_exclude is None else tuple(int8_exclude),
            parity_data=None if data is None else str(data), atol=atol, max_drop=max_drop, input=input,
        ),
        recipe,
    )  # fmt: skip
    ckpt = checkpoint(model, act, unsafe_load, features)
    if labels is not None:
        ckpt = dataclasses.replace(ckpt, labels=read_labels(labels, ckpt.config.num_classes))
    if out is None and isinstance(model, nn.Module):
        out = Path("exports") / f"{ckpt.config.variant}-{rec.target}-{rec.precision}"
    out_dir, _ = convert_checkpoint(ckpt, rec, None if out is None else Path(out))
    return out_dir


def _floats3(values: Sequence[float] | None) -> tuple[float, ...] | None:
    # Lists and ints are fine from Python (mean=[0.5, 0.5, 0.5]); strings and other lengths are not.
    if values is None or isinstance(values, str):
        return values  # type: ignore[return-value]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return tuple(values)


def parity(
    model: ModelLike,
    artifacts: str | Path | Iterable[str | Path],
    data: str | Path | None = None,
    samples: int = 200,
    *,
    atol: float | None = None,
    min_cosine: float | None = None,
    min_top1: float | None = None,
    max_abs_rms: float | None = None,
    localize: bool = False,
    threads: int | None = None,
    imgsz: int | tuple[int, int] | None = None,
    act: str | None = None,
    unsafe_load: bool = False,
) -> list[ArtifactResult]:
    """Run every artifact directory against `model` on the same images; one result (PASS/FAIL/NOT RUN) each.

    Verdicts are returned, not raised: `all(r.status == "PASS" for r in results)` is the gate. `imgsz` (one
    size or (height, width)) checks --dynamic-hw backbone artifacts at that size instead of their exported one."""
    override = tolerance_from_flags(atol=atol, min_cosine=min_cosine, min_top1=min_top1, max_abs_rms=max_abs_rms)
    check_count(samples, "--samples", "images")
    if threads is not None:
        check_count(threads, "--threads", "threads")
    dirs = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    size = None
    if imgsz is not None:  # before the checkpoint is read: a bad size costs nothing
        size = build_recipe({"imgsz": imgsz}).hw  # convert's --imgsz checks (multiples of 32, bounds)
        check_size(size, [(Path(d), mf.read(Path(d), verify=False)) for d in dirs])
    ckpt = checkpoint(model, act, unsafe_load)
    return gate(ckpt, dirs, None if data is None else str(data), samples, override, localize, threads, size)


def check_count(value: int, flag: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{flag} {value}: give a number of {what} >= 1")


class Artifact:
    """A converted artifact loaded with its runtime: `predict` from images or preprocessed arrays.

    Made by `load`; close it (or use `with`) to free the runtime."""

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None, batch: int | None = None) -> None:
        self.dir = folder
        self.manifest = manifest
        self.pre: Preprocess = preprocess_of(manifest)
        if batch is not None:
            check_count(batch, "--batch", "images")
            if batch > MAX_BATCH:
                raise BadInput(f"--batch {batch}: at most {MAX_BATCH} images per call")
        self.runner = get_target(manifest["target"]).runner(folder / manifest["artifact"], manifest, threads)
        fixed = self.runner.batch
        if batch is not None and fixed and batch != fixed:
            self.close()
            raise BadInput(f"--batch {batch}: {folder} has a fixed batch of {fixed}; drop --batch or give {fixed}")
        # Fixed-batch graphs take exactly their batch (the last chunk is padded); dynamic ones any.
        self.batch: int = fixed or batch or DEFAULT_BATCH

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None  # type: ignore[assignment]

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.get("labels")

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def outputs(self) -> list[dict]:
        """The artifact's outputs as the manifest names them: [{"name", "shape"}, ...] (one for a classifier)."""
        return mf.outputs(self.manifest)

    @property
    def is_classifier(self) -> bool:
        return is_classifier(self.manifest)

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Images (PIL, or file paths) as the artifact's NCHW float32 input, preprocessed as its manifest says."""
        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        return np.stack([self._one(item) for item in items]) if items else self._empty()

    def _one(self, item: ImageLike) -> np.ndarray:
        if isinstance(item, Image.Image):
            return self.pre(item)
        if not isinstance(item, (str, Path)):
            raise BadInput(f"images: give PIL images or file paths, not a {type(item).__name__}")
        try:
            with Image.open(item) as img:
                img.load()
                return self.pre(img)
        except IMAGE_ERRORS as err:
            raise BadInput(f"{item}: not a readable image ({str(err).splitlines()[0][:80]})") from None

    @property
    def input_hw(self) -> tuple[int, int]:
        """The (height, width) the artifact's preprocessing makes (a backbone's may differ from each other)."""
        size = self.pre.size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def _empty(self) -> np.ndarray:
        return np.zeros((0, 3, *self.input_hw), np.float32)

    def predict(self, x: np.ndarray | ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """Logits (N, classes) for a preprocessed NCHW float32 array, PIL images or image files; a backbone
        gives the list of its outputs. Runs in chunks of the artifact's batch (fixed batches padded)."""
        if isinstance(x, np.ndarray):
            return self._join(self.run(chunk) for chunk in self._chunks(self._checked(x)))
        items = [x] if isinstance(x, (str, Path, Image.Image)) else list(x)
        # Preprocessed a chunk at a time: a long list of files never sits in memory as one array.
        return self._join(
            self.run(self.preprocess(items[i : i + self.batch])) for i in range(0, len(items), self.batch)
        )

    def _checked(self, x: np.ndarray) -> np.ndarray:
        h, w = self.input_hw
        # A backbone exported with a dynamic height and width takes any size its manifest allows.
        any_hw = bool(self.manifest["input"].get("dynamic_hw"))
        if x.ndim != 4 or x.shape[1] != 3 or not (any_hw or x.shape[2:] == (h, w)):
            want = "H, W" if any_hw else f"{h}, {w}"
            raise BadInput(f"x: shape {list(x.shape)}; this artifact takes [N, 3, {want}] (NCHW, RGB)")
        if not np.issubdtype(x.dtype, np.floating):
            raise BadInput(f"x: dtype {x.dtype}; give preprocessed float32 (see Artifact.preprocess)")
        return x

    def _chunks(self, x: np.ndarray) -> Iterator[np.ndarray]:
        for i in range(0, len(x), self.batch):
            yield x[i : i + self.batch]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """One chunk of at most `batch` preprocessed images through the runtime: every output, unpadded."""
        if len(x) == 0:
            return []
        return [np.asarray(o, dtype=np.float32) for o in run_features(self.runner, x, self.batch)]

    def _join(self, chunks: Iterable[list[np.ndarray]]) -> np.ndarray | list[np.ndarray]:
        parts = [c for c in chunks if c]
        if not parts:
            shapes = [[d if isinstance(d, int) else 0 for d in o.get("shape", [0, 0])[1:]] for o in self.outputs]
            empty = [np.zeros((0, *shape), np.float32) for shape in shapes]
            return empty[0] if self.is_classifier else empty
        joined = [np.concatenate(group) for group in zip(*parts, strict=True)]
        return joined[0] if len(joined) == 1 and self.is_classifier else joined


def is_classifier(manifest: dict) -> bool:
    """Logits out (a backbone's manifest says kind backbone, or lists several outputs)."""
    return manifest.get("kind", "classifier") == "classifier" and len(mf.outputs(manifest)) == 1


def load(path: str | Path, threads: int | None = None, batch: int | None = None) -> Artifact:
    """An artifact directory written by convert (or the artifact file in it), after its sha256 check.

    BackendUnavailable when its runtime is missing here; `batch` is the chunk size for a dynamic artifact."""
    folder = Path(path)
    if folder.is_file() and (folder.parent / mf.MANIFEST).is_file():
        folder = folder.parent
    if threads is not None:
        check_count(threads, "--threads", "threads")
    return Artifact(folder, mf.read(folder, verify=True), threads, batch)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(logits: np.ndarray, k: int, labels: list[str] | None) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable classes: [{"index", "label" (None without labels), "score"}, ...]."""
    probs = softmax(logits)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"index": int(i), "label": labels[i] if labels else None, "score": float(p[i])} for i in row]
        for row, p in zip(order, probs, strict=True)
    ]


def output_stats(outputs: list[np.ndarray], specs: list[dict]) -> list[list[dict[str, Any]]]:
    """Per image, each output's name, shape and statistics (what predict says about a backbone)."""
    rows = []
    for i in range(len(outputs[0]) if outputs else 0):
        row = []
        for out, spec in zip(outputs, specs, strict=False):
            y = out[i].astype(np.float64)
            row.append(
                {
                    "name": spec.get("name"),
                    "shape": list(y.shape),
                    "mean": float(y.mean()),
                    "std": float(y.std()),
                    "min": float(y.min()),
                    "max": float(y.max()),
                }
            )
        rows.append(row)
    return rows


def image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given and folders expanded (recursive, sorted). A path that does not exist is BadInput before
    anything runs; an unreadable file is warned about and skipped when it is decoded."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise BadInput(f"{_few(missing)}: no such file or folder; give image files or folders of images")
    for p in paths:
        if p.is_dir():
            found = list_images(p)
            if not found:
                log.warning("%s: no images (%s) under it; skipped", p, ", ".join(sorted(IMAGE_SUFFIXES)))
            yield from found
        else:
            yield p


def predict(art: Artifact, paths: Iterable[str | Path], top: int = 5) -> Iterator[dict[str, Any]]:
    """Per readable image, in order: {"file", "top": [{"index", "label", "score"}, ...]} for a classifier, or
    {"file", "outputs": [{"name", "shape", "mean", "std", "min", "max"}, ...]} for a backbone.

    Images are streamed a batch at a time, decoded in threads while the runtime works (memory does not grow
    with their number); one warning per unreadable file; BadInput when none is readable."""
    check_count(top, "--top", "classes")
    given = list(paths)
    files = list(image_files(given))
    # One stream over files from anywhere: relative names stay as given; with any absolute one, every file is
    # named from the filesystem root (and shown as given in the results).
    if any(f.is_absolute() for f in files):
        root, listed = Path(Path.cwd().anchor), [f.absolute() for f in files]
    else:
        root, listed = Path(), files
    shown = {str(f.relative_to(root)): str(given_as) for f, given_as in zip(listed, files, strict=True)}
    stream = ImageStream(root, listed, None, art.pre, "predict")
    n = 0
    try:
        for x, _, names in stream.batches(art.batch):
            outs = art.run(x)
            if art.is_classifier:
                rows = [{"top": row} for row in top_k(outs[0], top, art.labels)]
            else:
                rows = [{"outputs": row} for row in output_stats(outs, art.outputs)]
            for name, row in zip(names, rows, strict=True):
                n += 1
                yield {"file": shown[name]} | row
    except BadInput:
        if n:
            raise
        shown_args = ", ".join(map(str, given[:3])) + (" ..." if len(given) > 3 else "")
        raise BadInput(f"{shown_args}: no readable image") from None


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def class_mapping(classes: list[str], manifest: dict, d: Path, data: str) -> tuple[np.ndarray, str]:
    """Model output index of each class folder (sorted), and how it was found: by the manifest's labels (by
    name) when it has labels, otherwise the sorted folder order."""
    labels = manifest.get("labels")
    if labels:
        unknown = [c for c in classes if c not in labels]
        if unknown:
            raise BadInput(
                f"--data {data}: class folder(s) {_few(unknown)} are not among {d}'s labels "
                f"({_few(labels)}); name the folders after the labels"
            )
        return np.array([labels.index(c) for c in classes]), "manifest labels (by name)"
    num_classes = manifest["model"]["num_classes"]
    if len(classes) > num_classes:
        raise BadInput(
            f"--data {data}: {len(classes)} class folders for {d}'s {num_classes} outputs (and its manifest "
            "names no classes); give one folder per class"
        )
    return np.arange(len(classes)), "sorted folder order (the manifest has no labels)"


def val(
    artifacts: str | Path | Iterable[str | Path],
    data: str | Path,
    samples: int | None = None,
    *,
    batch: int | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Top-1/top-5 accuracy of each artifact on a labelled ImageFolder tree (one folder per class), no checkpoint.

    Images are streamed a batch at a time (decoded in threads while the runtime works), so memory stays flat
    in the number of images. One dict per artifact: artifact, target, precision, n, top1, top5 (None with 5
    classes or fewer), mapping, skipped, seconds, images_per_s, batch."""
    dirs = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    if samples is not None:
        check_count(samples, "--samples", "images")
    for value, flag, what in ((batch, "--batch", "images"), (threads, "--threads", "threads")):
        if value is not None:
            check_count(value, flag, what)
    # Every hash, the data's layout and each class mapping are checked before any artifact runs.
    jobs = []
    streams: dict[Preprocess, Any] = {}
    for d in map(Path, dirs):
        manifest = mf.read(d, verify=True)
        if not is_classifier(manifest):
            raise BadInput(f"{d}: a backbone artifact has no classes to score; val needs a classifier")
        fixed = manifest["input"]["shape"][0]
        if batch is not None and isinstance(fixed, int) and batch != fixed:
            raise BadInput(f"--batch {batch}: {d} has a fixed batch of {fixed}; drop --batch or give {fixed}")
        pre = preprocess_of(manifest)
        if pre not in streams:  # listed once per preprocessing; decoded again for each artifact, never kept
            streams[pre] = open_images(data, pre, samples)
            if streams[pre].classes is None:
                raise BadInput(
                    f"--data {data}: not a labelled ImageFolder tree; give one folder per class with the images "
                    "directly inside"
                )
        jobs.append((d, manifest, streams[pre], *class_mapping(streams[pre].classes, manifest, d, str(data))))
    results = []
    for d, manifest, stream, to_model, mapping in jobs:
        log.info("%s: class folders mapped to outputs by %s", d, mapping)
        with Artifact(d, manifest, threads, batch) as art:
            results.append(_accuracy(art, stream, to_model) | {"mapping": mapping})
    return results


def _accuracy(art: Artifact, stream: Any, to_model: np.ndarray) -> dict[str, Any]:
    n = top1 = top5 = 0
    start = time.perf_counter()
    with progress(f"val {art.dir}", stream.count) as advance:
        for x, labels, _ in stream.batches(art.batch):
            (logits,) = art.run(x)[:1]
            truth = to_model[labels]
            top1 += int((logits.argmax(1) == truth).sum())
            k = min(5, logits.shape[1])
            top5 += int((np.argpartition(-logits, k - 1, axis=1)[:, :k] == truth[:, None]).any(1).sum())
            n += len(x)
            advance(len(x))
    seconds = time.perf_counter() - start
    manifest = art.manifest
    return {
        "artifact": str(art.dir),
        "target": manifest["target"],
        "precision": manifest["precision"],
        "n": n,
        "top1": top1 / n,
        # With 5 classes or fewer every class is in the top 5: a 100% that would mean nothing.
        "top5": top5 / n if art.num_classes > 5 else None,
        "skipped": len(stream.skipped),
        "seconds": seconds,
        "images_per_s": n / seconds,
        "batch": art.batch,
    }


VAL_TITLE = "Validation accuracy"
VAL_KEYS = {"artifact", "n", "top1", "top5"}


def tabulate_val(results: list[dict[str, Any]], data: str) -> str:
    """A Markdown table of val results (the terminal output and the .md report)."""
    lines = [
        f"{VAL_TITLE} on {data}",
        "",
        "| artifact | target | precision | images | top-1 | top-5 | skipped | images/s | classes mapped by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        top5 = "n/a" if r["top5"] is None else f"{r['top5']:.2%}"
        lines.append(
            f"| {r['artifact']} | {r['target']} | {r['precision']} | {r['n']} | {r['top1']:.2%} | {top5} | "
            f"{r['skipped']} | {r['images_per_s']:.1f} | {r['mapping']} |"
        )
    return "\n".join(lines) + "\n"


def is_val_report(path: Path) -> bool:
    """An earlier `fnexport val --report` file: the Markdown table, or a JSON list of val results."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".md":
        return text.startswith(VAL_TITLE)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(data, list) and all(isinstance(r, dict) and VAL_KEYS <= r.keys() for r in data)


def check_val_report(path: Path) -> None:
    """--report of val: a .json/.md file name, new or an earlier val report (never another file)."""
    check_report(path, is_val_report, "val report")


def write_val_report(path: Path, results: list[dict[str, Any]], table: str) -> None:
    mf.write_text(path, json.dumps(results, indent=2) + "\n" if path.suffix == ".json" else table)
