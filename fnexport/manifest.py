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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fnexport.errors import BadInput, CheckFailed, FnexportError
from fnexport.model.checkpoint import sha256_file
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


def write(out_dir: Path, manifest: dict) -> Path:
    """Write manifest.json whole or not at all (a temp file renamed over it), so a reader never sees half of one."""
    path = out_dir / MANIFEST
    staged = out_dir / f".{MANIFEST}.tmp{os.getpid()}"
    try:
        staged.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return path


def read(artifact_dir: Path, verify: bool = True) -> dict:
    """Load a manifest; with `verify`, fail (exit 1) when the artifact's bytes no longer match it."""
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise BadInput(f"{artifact_dir}: no {MANIFEST}; give a directory written by `fnexport convert`")
    try:
        manifest = json.loads(path.read_text())
        artifact = artifact_dir / manifest["artifact"]
        expected = manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BadInput(f"{path}: not an fnexport manifest ({err}); re-run `fnexport convert`") from None
    if verify:
        if not artifact.exists():
            raise CheckFailed(f"{artifact}: listed in {path} but missing")
        actual = sha256_artifact(artifact)
        if actual != expected:
            raise CheckFailed(
                f"{artifact}: sha256 {actual[:12]}... differs from its manifest ({expected[:12]}...): modified or truncated"
            )
    return manifest


# Writes that fail because of the disk, not fnexport: the user frees space or picks another --out.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces `out` in one rename, on failure it vanishes."""
    out = out.resolve()
    check_out(out)
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


def check_out(out: Path) -> None:
    """Fail before any work when `out` cannot become an fnexport output directory."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is a file; choose a directory path with --out")
    check_replaceable(out)
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"{ancestor}: is a file, so {out} cannot be made; choose another --out")


def check_replaceable(out: Path) -> None:
    """Only an earlier fnexport output (or an empty dir) may be replaced: never a user's folder of other files."""
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise BadInput(f"{out}: exists, is not empty and holds no {MANIFEST}; choose a new or empty --out")


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
