"""manifest.json: what an artifact is, where it came from, and what was verified; written atomically."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fnexport.data import INTERPOLATIONS
from fnexport.errors import BadInput, CheckFailed, FnexportError, what_is
from fnexport.model.checkpoint import sha256_file
from fnexport.model.fasternet import FasterNetConfig
from fnexport.recipes import MAX_BATCH, MIN_CROP_PCT, PRECISIONS, Tolerance
from fnexport.version import __version__

MANIFEST = "manifest.json"
SCHEMA = 1


def versions(*packages: str) -> dict[str, str]:
    found = {"fnexport": __version__}
    for name in ("torch", "onnx", *packages):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def sha256_artifact(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted) for bundles."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


def outputs(manifest: dict) -> list[dict]:
    """An artifact's outputs as its manifest names them: [{"name", "shape"}, ...] (one for a classifier)."""
    outs = manifest.get("outputs", manifest.get("output"))
    outs = outs if isinstance(outs, list) else [outs or {"name": "logits"}]
    return [o if isinstance(o, dict) else {"name": str(o)} for o in outs]


def write(out_dir: Path, manifest: dict) -> Path:
    """Write manifest.json whole or not at all (a temp file renamed over it), so a reader never sees half of one."""
    path = out_dir / MANIFEST
    write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read(artifact_dir: Path, verify: bool = True) -> dict:
    """Load a manifest; with `verify`, fail (exit 1) when the artifact's bytes no longer match it."""
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise BadInput(f"{artifact_dir}: no {MANIFEST}; give a directory written by `fnexport convert`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(f"{path}: not an fnexport manifest ({err}); re-run `fnexport convert`") from None
    check_schema(manifest, path)
    artifact, expected = artifact_dir / manifest["artifact"], manifest["sha256"]
    if verify:
        if not artifact.exists():
            raise CheckFailed(f"{artifact}: listed in {path} but missing")
        actual = sha256_artifact(artifact)
        if actual != expected:
            raise CheckFailed(
                f"{artifact}: sha256 {actual[:12]}... differs from its manifest ({expected[:12]}...): modified or truncated"
            )
    return manifest


class _Input(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    shape: list[int | Literal["batch", "height", "width"]] = Field(min_length=4, max_length=4)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    crop_pct: float = Field(ge=MIN_CROP_PCT, le=1)
    interpolation: Literal[tuple(INTERPOLATIONS)]  # type: ignore[valid-type]


class _Source(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    path: str
    sha256: str | None


class _RecipeRead(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    imgsz: int | list[int]
    tolerance: Tolerance = Tolerance()


class _Manifest(BaseModel):
    """What readers of manifest.json rely on; a hand-edited manifest is checked against it before any use."""

    model_config = ConfigDict(extra="allow", strict=True)
    target: str
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    artifact: str = Field(min_length=1)
    sha256: str
    input: _Input
    model: dict
    source: _Source
    recipe: _RecipeRead
    details: dict = {}


def check_schema(manifest: object, path: Path) -> None:
    """Exit 2 naming the key when a manifest (hand-edited, or not fnexport's) lacks or garbles what readers use."""
    try:
        spec = _Manifest.model_validate(manifest)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(manifest)"
        raise BadInput(f"{path}: {loc}: {first['msg']}; re-run `fnexport convert` instead of editing it") from None
    n, c, h, w = spec.input.shape
    batch_ok = n == "batch" or (isinstance(n, int) and 1 <= n <= MAX_BATCH)
    if getattr(spec, "kind", "classifier") == "backbone":
        # Backbones: H x W (or height/width when dynamic), the size parity ran at in input.size.
        size = getattr(spec.input, "size", None)
        size_ok = (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(s, int) and s >= 32 and s % 32 == 0 for s in size)
            and ([h, w] == size or [h, w] == ["height", "width"])
        )
        if not (batch_ok and c == 3 and size_ok):
            raise BadInput(
                f"{path}: input.shape {spec.input.shape} / input.size {size} is not [batch, 3, H, W] "
                "(or height, width) with H, W multiples of 32"
            )
        imgsz = size[0] if size[0] == size[1] else size
    else:
        size_ok = isinstance(h, int) and h == w and h >= 32 and h % 32 == 0
        if not (batch_ok and c == 3 and size_ok):
            raise BadInput(f"{path}: input.shape {spec.input.shape} is not [batch, 3, S, S] with S a multiple of 32")
        imgsz = h
    if min(spec.input.std) <= 0:
        raise BadInput(f"{path}: input.std {spec.input.std}: every std must be > 0")
    if spec.recipe.imgsz != imgsz:
        raise BadInput(f"{path}: recipe.imgsz {spec.recipe.imgsz} differs from input.shape {spec.input.shape}")
    # The artifact is opened (and hashed) by this name: it must stay inside the manifest's folder.
    name = Path(spec.artifact)
    if name.is_absolute() or len(name.parts) != 1 or name.name in (".", ".."):
        raise BadInput(f"{path}: artifact {spec.artifact!r} is not a name inside {path.parent}")
    counts = {"params", "macs", "variant"}
    try:
        FasterNetConfig(**{k: v for k, v in spec.model.items() if k not in counts})
        if not isinstance(spec.model.get("macs"), int):
            raise ValueError("macs is not an integer")
    except (TypeError, ValueError) as err:
        raise BadInput(f"{path}: model: {err}") from None


def owned(folder: Path) -> set[str]:
    """The names in an fnexport output folder that fnexport wrote: its manifest and the files the manifest lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    # Manifests from before `files` was recorded list only their artifact.
    files = manifest.get("files", [manifest.get("artifact")]) if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return set()
    return {MANIFEST} | {f for f in files if isinstance(f, str) and f and "/" not in f}


def remove_output(folder: Path) -> None:
    """Delete an earlier fnexport output folder, after checking that it holds only what fnexport wrote."""
    if folder.is_dir():
        check_replaceable(folder)
        shutil.rmtree(folder)


def write_text(path: Path, text: str) -> None:
    """Write a whole file or none of it (a temp file renamed over it)."""
    staged = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def resolved(out: Path, flag: str = "--out") -> Path:
    """`out` made absolute with symlinks followed; a symlink loop is bad input, named as one."""
    try:
        return out.resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError("Symlink loop from ...")
        loop = isinstance(err, RuntimeError) or err.errno == errno.ELOOP
        raise BadInput(f"{flag} {out}: {'is a symlink loop' if loop else 'cannot be resolved'} ({err})") from None


# Writes that fail because of the disk, not fnexport: the user frees space or picks another --out.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextmanager
def atomic_dir(out: Path, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces `out` in one rename, on failure it vanishes.

    `check` (default check_out: new, empty or an earlier fnexport output) runs on `out` first."""
    out = resolved(out)
    (check or check_out)(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise BadInput(f"{out.parent}: cannot write there ({err.strerror}); choose another --out") from None
    try:
        try:
            yield tmp
        except Exception as err:
            known = isinstance(err, OSError) and err.errno in DISK_ERRORS
            # Backends report a full disk their own way (OpenVINO: "basic_ios::clear: iostream error",
            # coremltools: shutil.Error), so a failed write on a full filesystem counts as one too.
            full = None if isinstance(err, FnexportError) else full_disk(out.parent, Path(tempfile.gettempdir()))
            if not (known or full):
                raise
            reason = err.strerror if known else f"no space left on device ({type(err).__name__})"
            raise BadInput(f"{full or out.parent}: {reason} while writing; nothing was written to {out}") from None
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def full_disk(*paths: Path) -> Path | None:
    """The first of `paths` whose filesystem has less than 1 MiB left, if any."""
    for path in paths:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path).free < 1 << 20:
                return path
    return None


def check_out(out: Path, replace: bool = True) -> None:
    """Fail before any work when `out` cannot become an fnexport output directory.

    With `replace` an earlier fnexport output may be replaced; without, `out` must be new or empty."""
    out = resolved(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and {what_is(out)}; choose a directory path with --out")
    if replace:
        check_replaceable(out)
    elif out.is_dir() and any(out.iterdir()):
        raise BadInput(f"{out}: exists and is not empty; choose a new or empty --out folder")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"{ancestor}: is a file, so {out} cannot be made; choose another --out")


def check_replaceable(out: Path) -> None:
    """Only an empty dir, or an earlier fnexport output holding nothing but what its manifest lists, may be
    replaced: never a user's folder, nor a user's file put into an fnexport output (notes, the checkpoint)."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise BadInput(f"{out}: exists, is not empty and holds no {MANIFEST}; choose a new or empty --out")
    foreign = sorted(set(os.listdir(out)) - owned(out))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadInput(
            f"{out}: holds files fnexport did not write ({shown}), which replacing the folder would delete; "
            "move them out or choose another --out"
        )


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, moving a previous `out` aside first; with concurrent writers the last rename wins."""
    old = None
    try:
        for attempt in range(100):
            try:
                os.replace(tmp, out)  # atomic; fails only if `out` is a non-empty dir
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            check_replaceable(out)
            # Move it aside and retry: another process may rename its own result into place in between,
            # and that result is moved aside in turn, so `out` is always one whole, verified set.
            old = old or Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            with contextlib.suppress(FileNotFoundError):
                os.replace(out, old / str(attempt))
        raise FnexportError(f"{out}: could not be replaced after 100 attempts (other writers keep replacing it)")
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
