"""manifest.json: what an artifact is, where it came from, and what was verified; written atomically."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fnexport import __version__
from fnexport.errors import BadInput, CheckFailed
from fnexport.model.checkpoint import sha256_file

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
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


def write(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
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


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh sibling temp dir; on success it replaces `out` in one rename, on failure it vanishes."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: exists and is a file; choose a directory path with --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise BadInput(f"{out.parent}: cannot write there ({err.strerror}); choose another --out") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            # Move the previous result aside first so a concurrent reader never sees a half dir.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "prev")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
