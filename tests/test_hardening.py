"""Bad input, interrupted and concurrent runs, full or read-only disks, and reproducible artifacts.

Each bad input must end in one line on stderr and exit 2, with no traceback and nothing left behind.
The README's "Reliability" table lists these cases and the tests here that cover them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fnexport import manifest as mf
from fnexport.comparison import compare, tolerance_for
from fnexport.conversion import convert
from fnexport.data import Preprocess, embedded, load_images
from fnexport.errors import BackendUnavailable
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance, load_recipe
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    """fnexport's temporary files in a folder: atomic-write dirs (.NAME.tmp-*, .NAME.old-*) and workdirs."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or "fnexport-" in p.name)


def assert_one_line_exit_2(code: int, stdout: str, stderr: str, message: str, after_progress: bool = False) -> None:
    """Exit 2, nothing on stdout, one `error:` line naming the problem; before it only progress logs, if any."""
    assert code == 2, stderr
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr
    assert len(lines) == 1 or (after_progress and not any(ln.startswith("error") for ln in lines[:-1])), stderr


@pytest.fixture(scope="module")
def t0(layouts) -> str:
    return str(layouts["official"])


@pytest.fixture(scope="module")
def small_path(custom_model, tmp_path_factory) -> str:
    """A 48-wide FasterNet with 5 blocks (T0 has 13): a faster export, for tests that convert a lot."""
    path = tmp_path_factory.mktemp("small") / "custom.pth"
    torch.save(custom_model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def small_ckpt(small_path):
    return load_checkpoint(small_path, act="relu")


# -- checkpoints: missing and truncated are in test_cli.py, the loader's cases in model/test_checkpoint.py --


@pytest.fixture(scope="module")
def bad_checkpoints(layouts, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("bad_ckpt")
    (folder / "empty.pth").write_bytes(b"")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, folder / "resnet.pth")
    (folder / "notes.pth").write_text("not a checkpoint\n")
    (folder / "a_folder.pth").mkdir()
    (folder / "labels.json").write_text('["cat", "dog"]')
    data = layouts["official"].read_bytes()
    # Bytes flipped in the middle of the zip's tensor data: the CRC-checked torch reader must notice.
    (folder / "corrupt.pth").write_bytes(data[:4000] + bytes(b ^ 0xFF for b in data[4000:4100]) + data[4100:])
    return {
        "empty": (folder / "empty.pth", "empty"),
        "foreign": (folder / "resnet.pth", "no FasterNet weights"),
        "text": (folder / "notes.pth", "notes.pth"),
        "directory": (folder / "a_folder.pth", "is a folder"),
        "json": (folder / "labels.json", "labels.json"),
        "corrupt": (folder / "corrupt.pth", "fails its CRC check"),
        "pickled_module": (layouts["module"], "--unsafe-load"),
    }


@pytest.mark.parametrize("case", ["empty", "foreign", "text", "directory", "json", "corrupt", "pickled_module"])
def test_bad_checkpoint_exit_2_and_no_output(bad_checkpoints, case, tmp_path):
    path, message = bad_checkpoints[case]
    code, stdout, stderr = cli("convert", str(path), "--imgsz", "64", "-o", str(tmp_path / "out"))
    assert_one_line_exit_2(code, stdout, stderr, message)
    assert list(tmp_path.iterdir()) == []


# -- --imgsz: 100 and 16 on convert are in test_cli.py --


@pytest.mark.parametrize(
    "command, imgsz, message",
    [
        ("convert", "0", "greater than or equal to 32"),
        ("convert", "-32", "greater than or equal to 32"),
        ("convert", "225", "try 224"),
        ("inspect", "100", "not a multiple of 32"),
        ("inspect", "16", "greater than or equal to 32"),
    ],
)
def test_bad_imgsz_exit_2(command, imgsz, message, tmp_path):
    out = ["-o", str(tmp_path / "out")] if command == "convert" else []
    code, stdout, stderr = cli(command, "fasternet_t0", "--imgsz", imgsz, *out)
    assert_one_line_exit_2(code, stdout, stderr, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("convert", "fasternet_t0", "--imgsz", "large"), "--imgsz 'large': give one size (square) or HEIGHT,WIDTH"),
        (("convert", "fasternet_t0", "--batch", "many"), "Invalid value for '--batch'"),
        (("convert",), "Missing argument 'ckpt'"),
        (("convert", "fasternet_t0", "--bogus"), "No such option: --bogus"),
        (("nosuch",), "No such command 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    """click's own parse errors (bad option value, missing argument) too: one line, not its usage box."""
    code, stdout, stderr = cli(*args)
    assert_one_line_exit_2(code, stdout, stderr, message)


# -- calibration and parity folders --


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels: a decompression bomb's first bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_junk(folder: Path) -> list[str]:
    """Files a user's image folder really holds besides images; returns the names that look like images."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("calibration set v2\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    (folder / "notes.jpg").write_text("this is text with a .jpg name")
    (folder / "empty.png").write_bytes(b"")
    good = embedded("natural") / "coffee_1.png"
    (folder / "cut.png").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (folder / "bomb.png").write_bytes(png_claiming(40_000, 40_000))
    (folder / "folder.jpg").mkdir()
    return ["bomb.png", "cut.png", "empty.png", "notes.jpg"]


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, caplog):
    bad = write_junk(tmp_path / "calib")
    for name in ("chelsea_0.jpg", "coffee_1.png", "camera_2.jpg"):
        shutil.copyfile(embedded("natural") / name, tmp_path / "calib" / name)
    images = load_images(tmp_path / "calib", Preprocess(64))
    assert images.x.shape == (3, 3, 64, 64) and np.isfinite(images.x).all()
    assert sorted(Path(p).name for p in images.skipped) == bad
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"{name}: skipped" in warned for name in bad)


def test_calibration_folder_with_no_usable_image_exit_2(t0, tmp_path):
    write_junk(tmp_path / "calib")
    code, stdout, stderr = cli(
        "convert", t0, "--imgsz", "64", "--precision", "int8", "--calib", str(tmp_path / "calib"),
        "-o", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith("error: ") and "none of the 4 images could be read" in stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_folder_without_images_exit_2(t0, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("file,label\n")
    code, stdout, stderr = cli("convert", t0, "--imgsz", "64", "--data", str(tmp_path / "data"))
    assert_one_line_exit_2(code, stdout, stderr, "no images")


# -- output paths --


def test_output_path_that_is_a_file_exit_2(t0, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("keep me")
    code, stdout, stderr = cli("convert", t0, "--imgsz", "64", "-o", str(target))
    assert_one_line_exit_2(code, stdout, stderr, "exists and is a file")
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_output_under_a_file_exit_2(t0, tmp_path):
    (tmp_path / "file").write_text("x")
    code, stdout, stderr = cli("convert", t0, "--imgsz", "64", "-o", str(tmp_path / "file" / "out"))
    assert_one_line_exit_2(code, stdout, stderr, "is a file, so")


def test_a_folder_of_other_files_is_never_replaced(t0, tmp_path):
    """`--out .` in a project folder must not swap the project for an artifact."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n")
    code, stdout, stderr = cli("convert", t0, "--imgsz", "64", "-o", str(project))
    assert_one_line_exit_2(code, stdout, stderr, "holds no manifest.json")
    assert sorted(p.name for p in project.iterdir()) == ["train.py"] and leftovers(tmp_path) == []


def test_release_output_that_is_a_file_exit_2(t0, tmp_path):
    (tmp_path / "release").write_text("x")
    code, stdout, stderr = cli("release", t0, "--recipe", "fasternet_t0-onnx-fp32", "-o", str(tmp_path / "release"))
    assert_one_line_exit_2(code, stdout, stderr, "release")
    assert (tmp_path / "release").read_text() == "x"


def unshare_mount() -> list[str] | None:
    """A command prefix giving the child a private mount namespace where tmpfs can be mounted, or None.

    `unshare -rm` also works unprivileged (a user namespace), so developers' machines run the test too.
    """
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


DRIVER = """
import json, os, sys
from tests.test_cli import cli
runs, folders = json.loads(sys.argv[1]), json.loads(sys.argv[2])
results = [cli(*run) for run in runs]
print(json.dumps({"results": results, "left": {f: sorted(os.listdir(f)) for f in folders}}))
"""


def test_read_only_and_full_disks_exit_2(small_path, tmp_path):
    """A read-only tmpfs and a 64 KiB tmpfs, mounted in a private namespace only the child sees.

    As root (as on the project's machines and in CI) chmod cannot make a directory read-only, so a real
    read-only filesystem is used; the full disk is real too. Both mounts vanish with the child process,
    which lists what is left on them first. Each installed CPU backend writes into the full disk: they
    report it differently (ONNX: OSError ENOSPC, OpenVINO: a C++ iostream error, coremltools: shutil.Error).
    """
    prefix = unshare_mount()
    if prefix is None:
        pytest.skip("needs Linux where unshare(1) may mount a tmpfs (user or mount namespaces)")
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    args = [small_path, "--act", "relu", "--imgsz", "64"]
    targets = ["onnx"] + [
        t for t, m in (("openvino", "openvino"), ("coreml", "coremltools")) if importlib.util.find_spec(m)
    ]
    runs = [["convert", *args, "-o", str(ro / "out")]]
    runs += [
        ["convert", *args, "-t", t, "-o", str(full / t)] + (["--input", "tensor"] if t == "coreml" else [])
        for t in targets
    ]
    script = f'mount -t tmpfs -o ro,size=64k tmpfs {ro} && mount -t tmpfs -o size=64k tmpfs {full} && exec "$0" -c "$@"'
    result = subprocess.run(
        [*prefix, "sh", "-c", script, sys.executable, DRIVER, json.dumps(runs), json.dumps([str(ro), str(full)])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    (code, stdout, stderr), *written = report["results"]
    assert_one_line_exit_2(code, stdout, stderr, "Read-only file system")
    for target, (code, stdout, stderr) in zip(targets, written, strict=True):
        assert_one_line_exit_2(code, stdout, stderr, f"{full}: ", after_progress=True)
        assert "no space left on device" in stderr.lower() and "nothing was written" in stderr, (target, stderr)
    assert report["left"] == {str(ro): [], str(full): []}


# -- interrupted and concurrent conversions --


def fnexport_process(args: list[str], tmpdir: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.Popen(
        [sys.executable, "-m", "fnexport", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_conversion_cleans_up(t0, tmp_path, sig, code):
    """Ctrl-C (SIGINT) or a CI cancel (SIGTERM) mid-export: exit 130/143, no output, no temp files."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = fnexport_process(["convert", t0, "--imgsz", "64", "-o", str(tmp_path / "out")], tmpdir)
    deadline = time.monotonic() + 120
    # The atomic-write dir appears once the checkpoint is loaded; the export starts right after.
    while not any(".out.tmp-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted", stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("fnexport-")] == []


def test_concurrent_converts_into_one_folder(small_path, tmp_path):
    """FP32 and FP16 into the same --out at once: both succeed, the folder is one whole, hash-valid set."""
    out = tmp_path / "out"
    procs = [
        fnexport_process(
            ["convert", small_path, "--act", "relu", "--imgsz", "64", "-p", precision, "-o", str(out), "--json"],
            tmp_path,
        )
        for precision in ("fp32", "fp16")
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, stdout, stderr in results:
        assert code == 0, stderr[-2000:]
        assert json.loads(stdout)["out"] == str(out)
    manifest = mf.read(out)  # verifies the artifact's sha256
    graph = onnx.load(str(out / "model.onnx"))
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    assert fp16 == (manifest["precision"] == "fp16")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert leftovers(tmp_path) == []


def test_atomic_dir_interleaved_writers(tmp_path):
    """Two writers in one folder, finishing in either order: the last to finish wins, whole, no debris."""
    out = tmp_path / "out"
    with mf.atomic_dir(out) as a, mf.atomic_dir(out) as b:
        (a / "who").write_text("a")
        (b / "who").write_text("b")
        (a / mf.MANIFEST).write_text('{"files": ["who"]}')
        (b / mf.MANIFEST).write_text('{"files": ["who"]}')
    # b's block exits first (inner), then a's replaces it.
    assert (out / "who").read_text() == "a"
    with mf.atomic_dir(out) as c:
        (c / "who").write_text("c")
    assert sorted(p.name for p in out.iterdir()) == ["who"] and (out / "who").read_text() == "c"
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with mf.atomic_dir(out) as a:
        (a / mf.MANIFEST).write_text("{}")
    with pytest.raises(RuntimeError), mf.atomic_dir(out) as b:
        (b / "half").write_text("x")
        raise RuntimeError("export crashed")
    assert sorted(p.name for p in out.iterdir()) == [mf.MANIFEST] and leftovers(tmp_path) == []


# -- reproducible artifacts (FP32 ONNX: tests/targets/test_onnx.py) --


# Parity is not what these tests check (test_<target>.py do); a random 7-class model must just get through.
ANY = Tolerance(atol=1e3, min_cosine=-1.0, min_top1=0.0, max_abs_rms=1e3)


def files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# TensorRT FP16 is left out: its prepared ONNX comes from the same convert_fp16 as ONNX FP16.
@pytest.mark.parametrize("target, precision", [("onnx", "fp16"), ("onnx", "int8"), ("tensorrt", "int8")])
def test_converting_twice_gives_identical_bytes(small_ckpt, tmp_path, target, precision):
    calib = {"calib": "embedded:natural", "calib_samples": 32} if precision == "int8" else {}
    recipe = Recipe(target=target, precision=precision, imgsz=64, parity_samples=8, tolerance=ANY, **calib)
    for name in ("a", "b"):
        try:
            convert(small_ckpt, recipe, tmp_path / name)
        except BackendUnavailable:  # TensorRT without a GPU: the prepared ONNX is written, the engine is not
            assert target == "tensorrt"
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    # manifest.json differs by design where it records how long things took (the INT8 search's times)
    assert "model.onnx" in a and a.pop("manifest.json") and b.pop("manifest.json") and a == b
    ma, mb = mf.read(tmp_path / "a"), mf.read(tmp_path / "b")
    assert ma["sha256"] == mb["sha256"]
    assert untimed(ma) == untimed(mb)


def untimed(manifest: object) -> object:
    """The manifest without its wall-clock figures (seconds, latencies)."""
    timed = ("seconds", "latency_ms", "fp32_ms", "int8_ms", "speedup", "warning")
    if isinstance(manifest, dict):
        return {k: untimed(v) for k, v in manifest.items() if k not in timed}
    if isinstance(manifest, list):
        return [untimed(v) for v in manifest]
    return manifest


def test_openvino_is_reproducible_across_processes(small_path, tmp_path):
    """OpenVINO names constants from a process-wide counter (Constant_6 vs Constant_9876 when a process
    converts twice), so the same IR bytes come from separate runs: the CLI's case, checked here."""
    pytest.importorskip("openvino")
    procs = [
        fnexport_process(
            ["convert", small_path, "--act", "relu", "--imgsz", "64", "-t", "openvino", "-o", str(tmp_path / n)],
            tmp_path,
        )
        for n in ("a", "b")
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.communicate()[1][-2000:]
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_coreml_package_differs_only_in_its_ids(small_ckpt, tmp_path):
    """Core ML packages are not byte-reproducible: Manifest.json holds fresh UUIDs, the spec's maps are
    serialised in hash order, and coremltools numbers some constants from a process-wide counter
    (const_2 vs const_1 after other conversions). The weights file is identical, and so are the specs
    once those generated names are numbered in order of appearance."""
    ct = pytest.importorskip("coremltools")
    from google.protobuf import text_format

    recipe = Recipe(target="coreml", precision="fp32", imgsz=64, parity_samples=8, tolerance=ANY, input="tensor")
    for name in ("a", "b"):
        try:
            convert(small_ckpt, recipe, tmp_path / name)
        except BackendUnavailable:
            pass  # prediction needs macOS; the package is written
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    weights = [k for k in a if k.endswith("weight.bin")]
    assert weights and all(a[k] == b[k] for k in weights)

    def canonical_spec(name: str) -> str:
        text = text_format.MessageToString(ct.utils.load_spec(str(tmp_path / name / "model.mlpackage")))
        order: dict[str, str] = {}
        return re.sub(r"\bconst_\d+\b", lambda m: order.setdefault(m.group(), f"const#{len(order)}"), text)

    assert canonical_spec("a") == canonical_spec("b")


# == Round 2 (issue 20): what a hostile tester broke ==

RELU = ["--act", "relu", "--imgsz", "64"]


@pytest.fixture(scope="module")
def small_onnx(small_path, tmp_path_factory) -> Path:
    """An earlier fnexport output (ONNX FP32 of the small model); tests copy it before touching it."""
    out = tmp_path_factory.mktemp("small_onnx") / "A"
    code, _, stderr = cli("convert", small_path, *RELU, "-o", str(out))
    assert code == 0, stderr
    return out


def said(stderr: str) -> str:
    """Log lines on stderr as one line of words: the log handler wraps long lines."""
    return " ".join(stderr.split())


def copy_of(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def write_recipe(path: Path, **data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": "onnx", "imgsz": 64, "parity_samples": 8, **data}))  # JSON is YAML
    return path


# -- 1. outputs: fnexport replaces only what it wrote --


def test_convert_never_deletes_files_it_did_not_write(small_path, small_onnx, tmp_path):
    """The issue's reproduction: the checkpoint being converted and the user's notes sit in an earlier output."""
    victim = copy_of(small_onnx, tmp_path / "victim")
    shutil.copyfile(small_path, victim / "best.pth")
    (victim / "NOTES.txt").write_text("notes\n")
    before = files(victim)
    code, stdout, stderr = cli("convert", str(victim / "best.pth"), *RELU, "-o", str(victim))
    assert_one_line_exit_2(code, stdout, stderr, "holds files fnexport did not write (NOTES.txt, best.pth)")
    assert files(victim) == before and leftovers(tmp_path) == []
    # An earlier output holding only what its manifest lists is still replaced, and lists its files.
    clean = copy_of(small_onnx, tmp_path / "clean")
    code, _, stderr = cli("convert", small_path, *RELU, "-p", "fp16", "-o", str(clean))
    assert code == 0, stderr
    assert mf.read(clean)["precision"] == "fp16" and mf.read(clean)["files"] == ["model.onnx"]


def test_release_never_overwrites_a_users_files(small_path, small_onnx, tmp_path):
    recipe = write_recipe(tmp_path / "recipes" / "r.yaml")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my own summary\n")
    (mine / "summary.json").write_text('{"mine": true}\n')
    code, stdout, stderr = cli("release", small_path, "--act", "relu", "--recipe", str(recipe), "-o", str(mine))
    assert_one_line_exit_2(code, stdout, stderr, "holds files fnexport did not write (summary.json, summary.md)")
    assert (mine / "summary.md").read_text() == "my own summary\n" and len(list(mine.iterdir())) == 2
    # A user's file inside an artifact folder of an earlier release stops it as well.
    earlier = tmp_path / "earlier"
    copy_of(small_onnx, earlier / "r")
    (earlier / "r" / "NOTES.txt").write_text("mine\n")
    code, stdout, stderr = cli("release", small_path, "--act", "relu", "--recipe", str(recipe), "-o", str(earlier))
    assert_one_line_exit_2(code, stdout, stderr, "NOTES.txt")
    assert (earlier / "r" / "NOTES.txt").read_text() == "mine\n"


def test_release_refuses_a_recipe_for_another_variant_before_any_work(small_path, tmp_path):
    out = tmp_path / "rel"
    code, stdout, stderr = cli(
        "release", small_path, "--act", "relu", "--recipe", "fasternet_t0-onnx-fp32", "-o", str(out)
    )
    assert_one_line_exit_2(code, stdout, stderr, "but the recipe is for fasternet_t0")
    assert not out.exists()


def test_release_leaves_no_stale_folder_beside_its_verdict(small_path, tmp_path):
    """A stale NAME.FAILED never survives a passing NAME; a passing NAME never survives a failing rerun."""
    out = tmp_path / "rel"
    good = write_recipe(tmp_path / "good" / "r.yaml")
    assert cli("release", small_path, "--act", "relu", "--recipe", str(good), "-o", str(out))[0] == 0
    (out / "r").rename(out / "r.FAILED")  # what an earlier failing run leaves
    code, _, stderr = cli("release", small_path, "--act", "relu", "--recipe", str(good), "-o", str(out))
    assert code == 0, stderr
    assert (out / "r").is_dir() and not (out / "r.FAILED").exists()
    strict = write_recipe(tmp_path / "strict" / "r.yaml", tolerance={"atol": 1e-12})
    code, _, stderr = cli("release", small_path, "--act", "relu", "--recipe", str(strict), "-o", str(out))
    assert code == 1, stderr
    assert not (out / "r").exists() and not (out / "r.FAILED").exists()
    assert json.loads((out / "summary.json").read_text())["artifacts"][0]["status"] == "FAIL"


def test_parity_report_is_checked_first_and_never_overwrites(small_path, small_onnx, tmp_path):
    art = copy_of(small_onnx, tmp_path / "A")
    manifest = (art / "manifest.json").read_bytes()
    (tmp_path / "notes.md").write_text("mine\n")
    bad = [
        (art / "manifest.json", "exists and is not an fnexport parity report"),
        (tmp_path / "notes.md", "exists and is not an fnexport parity report"),
        (tmp_path / "missing" / "r.json", "no such file or folder; create it first"),
        (tmp_path / "r.txt", "use a .json or .md file name"),
    ]
    for report, message in bad:
        # One line and no progress: the checkpoint was not even loaded, the gate never ran.
        code, stdout, stderr = cli("parity", small_path, str(art), "--act", "relu", "--report", str(report))
        assert_one_line_exit_2(code, stdout, stderr, message)
    assert (art / "manifest.json").read_bytes() == manifest and (tmp_path / "notes.md").read_text() == "mine\n"
    reports = [str(tmp_path / "r.json"), str(tmp_path / "r.md")]
    for _ in range(2):  # the second run replaces the reports the first one wrote
        code, _, stderr = cli("parity", small_path, str(art), "--act", "relu", "--samples", "8",
                              "--report", reports[0], "--report", reports[1])  # fmt: skip
        assert code == 0, stderr
    assert json.loads(Path(reports[0]).read_text())[0]["status"] == "PASS"


INTERRUPTED_CALIB = """
import os, shutil, signal, sys
from fnexport.cli import main

real, copied = shutil.copyfile, []

def copy_then_ctrl_c(src, dst, **kw):  # stand-in recording the copies, then pressing Ctrl-C after 6
    copied.append(dst)
    real(src, dst, **kw)
    if len(copied) == 6:
        os.kill(os.getpid(), signal.SIGINT)

shutil.copyfile = copy_then_ctrl_c
sys.argv = ["fnexport", "calib", "embedded:digits", "-o", {out!r}, "--samples", "50"]
try:
    main()
finally:
    with open({count!r}, "w") as f:
        f.write(str(len(copied)))
"""


def test_calib_is_atomic_and_checks_its_options(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "calib"
    for args, message in [
        (["-o", str(tmp_path / "file")], "exists and is a file"),
        (["-o", str(out), "--per-class", "-1"], "--per-class -1"),
        (["-o", str(out), "--samples", "0"], "--samples 0"),
    ]:
        assert_one_line_exit_2(*cli("calib", "embedded:digits", *args), message)
    assert not out.exists()
    # Ctrl-C in a process of its own: a SIGINT sent to the pytest process, after the suite has loaded every
    # backend's native thread pools, killed pytest with a segfault (three full runs, none in this file alone).
    count = tmp_path / "copied.txt"
    script = INTERRUPTED_CALIB.format(out=str(out), count=str(count))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    code, stderr = result.returncode, result.stderr
    assert code == 130 and stderr.splitlines()[-1] == "interrupted" and count.read_text() == "6", stderr
    assert not out.exists() and leftovers(tmp_path) == []
    code, stdout, stderr = cli("calib", "embedded:digits", "-o", str(out), "--samples", "50")
    assert code == 0 and stdout.strip() == str(out), stderr
    assert len(list(out.rglob("*.png"))) == 50


# -- 2. every loop over user data ends --


@pytest.mark.timeout(60)
def test_malformed_checkpoints_end_quickly(t0_model, tmp_path):
    sd = t0_model.state_dict()
    self_wrapped: dict = {"epoch": 1}
    self_wrapped["model"] = self_wrapped  # a pickle may hold a dict that contains itself
    cases = {
        "teacher_only": ({f"teacher_model.{k}": v for k, v in sd.items()}, "no student weights"),
        "self_wrapped": (self_wrapped, "wrapped more than 8 levels deep"),
        "block_100000": ({**sd, "stages.0.blocks.100000.mlp.0.weight": torch.zeros(1)}, "has blocks [0, 100000]"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        code, stdout, stderr = cli("inspect", str(tmp_path / f"{name}.pth"))
        assert_one_line_exit_2(code, stdout, stderr, message)
    # Nested prefixes and keys that are not strings still load.
    torch.save({1: torch.zeros(1), **{f"model.module.{k}": v for k, v in sd.items()}}, tmp_path / "nested.pth")
    assert load_checkpoint(tmp_path / "nested.pth").layout == "official (model > module)"


# -- 3. a gate that can fail whatever the class count --


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "int4", "palettize4"])
@pytest.mark.parametrize("classes", [1, 2, 10])
def test_scaled_logits_fail_every_reduced_precision_gate(precision, classes):
    """5x logits keep every cosine and every top-1 class: only the error relative to the logit scale sees them."""
    rng = np.random.default_rng(classes)
    ref = rng.standard_normal((64, classes)) * 3
    healthy = compare(ref, (ref * (1 + 1e-3 * rng.standard_normal(ref.shape))).astype(np.float32),
                      tolerance_for(precision))  # fmt: skip
    assert healthy.passed, healthy.failures
    scaled = compare(ref, (5 * ref).astype(np.float32), tolerance_for(precision))
    assert not scaled.passed and scaled.max_abs_rms >= 4
    assert [f for f in scaled.failures if "x the logit RMS" in f] == scaled.failures  # cosine/top-1 still agree
    assert (scaled.top1 is None) == (classes == 1) and (scaled.top5 is None) == (classes <= 5)
    assert bool(scaled.not_applicable) == (classes == 1)


def scale_logits(artifact: Path, factor: float) -> None:
    """Multiply an ONNX model's output by `factor` (a Mul at the end), and re-hash it in its manifest."""
    model = onnx.load(str(artifact / "model.onnx"))
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = out + "_unscaled"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "scale"))
    model.graph.node.append(onnx.helper.make_node("Mul", [out + "_unscaled", "scale"], [out]))
    onnx.save(model, str(artifact / "model.onnx"))
    manifest = json.loads((artifact / mf.MANIFEST).read_text())
    manifest["sha256"] = mf.sha256_artifact(artifact / "model.onnx")
    mf.write(artifact, manifest)


def test_one_class_fp16_artifact_with_5x_logits_fails_the_gate(custom_model, tmp_path):
    """The issue's case end to end: a 1-class head, an FP16 artifact whose logits are 5x: PASS before."""
    sd = custom_model.state_dict()
    sd |= {"head.weight": sd["head.weight"][:1] * 3, "head.bias": sd["head.bias"][:1]}
    torch.save(sd, tmp_path / "one.pth")
    art = tmp_path / "one-fp16"
    code, _, stderr = cli("convert", str(tmp_path / "one.pth"), *RELU, "-p", "fp16", "-o", str(art), "--json")
    assert code == 0, stderr
    parity = mf.read(art)["parity"]
    assert parity["top1"] is None and parity["not_applicable"] and parity["max_abs_rms"] < 0.02
    scale_logits(art, 5.0)
    code, _, stderr = cli("parity", str(tmp_path / "one.pth"), str(art), "--act", "relu", "--samples", "16")
    assert code == 1 and "x the logit RMS > 0.02" in stderr, stderr


# -- 4. the manifest records the file's opset --


def test_opset_the_exporter_cannot_write_is_refused(small_path, tmp_path):
    for opset in ("13", "17", "24"):
        code, stdout, stderr = cli("convert", small_path, *RELU, "--opset", opset, "-o", str(tmp_path / "o"))
        assert_one_line_exit_2(code, stdout, stderr, "choose 18..23")
    recipe = write_recipe(tmp_path / "old.yaml", opset=13)
    code, stdout, stderr = cli("convert", small_path, "--act", "relu", "--recipe", str(recipe))
    assert_one_line_exit_2(code, stdout, stderr, f"{recipe}: opset: 13 is outside 18..23")


def test_manifest_opset_is_the_files(small_path, small_onnx, tmp_path):
    out = tmp_path / "o18"
    assert cli("convert", small_path, *RELU, "--opset", "18", "-o", str(out))[0] == 0
    for folder, opset in ((out, 18), (small_onnx, 20)):
        manifest = mf.read(folder)
        model = onnx.load(str(folder / "model.onnx"))
        declared = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert declared == manifest["onnx_opset"] == manifest["recipe"]["opset"] == opset


# -- 5. bad checkpoints: named on load, before any artifact can be blamed --


def damage(sd: dict, key: str, edit) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    edit(sd, key)
    return sd


DAMAGE = {
    "nan": ("stages.4.blocks.3.mlp.0.weight", lambda sd, k: sd[k].view(-1).__setitem__(0, float("nan")),
            "stages.4.blocks.3.mlp.0.weight holds 1 NaN/Inf"),
    "inf": ("head.bias", lambda sd, k: sd[k].__setitem__(0, float("inf")), "head.bias holds 1 NaN/Inf"),
    "negative_var": ("stages.2.blocks.0.mlp.1.running_var", lambda sd, k: sd[k].__setitem__(0, -1.0),
                     "stages.2.blocks.0.mlp.1.running_var has negative values"),
    "zero_classes": ("head", lambda sd, k: sd.update({"head.weight": sd["head.weight"][:0],
                                                      "head.bias": sd["head.bias"][:0]}),
                     "head.weight is empty"),
    "one_channel": ("patch_embed.proj.weight", lambda sd, k: sd.__setitem__(k, sd[k][:, :1].contiguous()),
                    "the stem takes 1 input channel"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_on_load(t0_model, tmp_path, case):
    key, edit, message = DAMAGE[case]
    path = tmp_path / f"{case}.pth"
    torch.save(damage(t0_model.state_dict(), key, edit), path)
    code, stdout, stderr = cli("inspect", str(path))
    assert_one_line_exit_2(code, stdout, stderr, f"{path}: {message}")


def test_parity_blames_the_checkpoint_not_a_healthy_artifact(custom_model, small_onnx, tmp_path):
    path = tmp_path / "nan.pth"
    torch.save(
        damage(custom_model.state_dict(), "head.weight", lambda sd, k: sd[k].__setitem__((0, 0), float("inf"))), path
    )
    code, stdout, stderr = cli("parity", str(path), str(small_onnx), "--act", "relu")
    assert_one_line_exit_2(code, stdout, stderr, "head.weight holds 1 NaN/Inf")


def test_stored_labels_that_do_not_fit_are_ignored_with_a_warning(t0_model, tmp_path):
    """Ignored, not refused: the weights are good, the names optional, and --labels FILE replaces them."""
    path = tmp_path / "five_labels.pth"
    torch.save({"model": t0_model.state_dict(), "labels": ["a", "b", "c", "d", "e"]}, path)
    code, stdout, stderr = cli("inspect", str(path), "--json")
    assert code == 0 and json.loads(stdout)["labels"] is None
    assert "5 stored labels do not name its 1000 classes" in said(stderr)


def test_safetensors_load_in_every_layout(layouts, t0_model, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in t0_model.state_dict().items()}
    labels = [f"c{i}" for i in range(1000)]
    save_file(sd, tmp_path / "official.safetensors", metadata={"labels": json.dumps(labels)})
    save_file({f"model.{k}": v for k, v in sd.items()}, tmp_path / "lightning.safetensors")
    save_file({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.bin")  # found by content, not name
    x = torch.randn(2, 3, 64, 64)
    ref = t0_model(x)
    for name in ("official.safetensors", "lightning.safetensors", "ddp.bin"):
        ckpt = load_checkpoint(tmp_path / name)
        assert torch.allclose(ckpt.model(x), ref, atol=1e-5), name
    assert load_checkpoint(tmp_path / "official.safetensors").labels == labels
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((tmp_path / "official.safetensors").read_bytes()[:100_000])
    assert_one_line_exit_2(*cli("inspect", str(truncated)), "truncated or not a safetensors file")


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_torch_save_loads(t0_model, tmp_path, protocol):
    """torch.save(_use_new_zipfile_serialization=False): not a Paddle file, and no --unsafe-load needed."""
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": t0_model.state_dict()}, path, _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(load_checkpoint(path).model(x), t0_model(x), atol=1e-5)
    module = tmp_path / "module.pth"  # a pickled module in the legacy format still needs the opt-in
    torch.save(t0_model, module, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert_one_line_exit_2(*cli("inspect", str(module)), "--unsafe-load")
    assert load_checkpoint(module, unsafe_load=True).config.variant == "fasternet_t0"


def test_other_files_are_named_as_what_they_are(small_onnx, tmp_path):
    png = tmp_path / "photo.pth"
    shutil.copyfile(embedded("natural") / "coffee_1.png", png)
    for path, message in [(small_onnx / "model.onnx", "is an ONNX model"), (png, "is an image")]:
        code, stdout, stderr = cli("convert", str(path), "-o", str(tmp_path / "o"))
        assert_one_line_exit_2(code, stdout, stderr, message)
        assert "--unsafe-load" not in stderr


# -- 6 and 8. a user's mistake: one line naming the flag as written, exit 2, before any work --


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "{ckpt}", "--act", "GELU"], "--act GELU: did you mean gelu?"),
        (["inspect", "{ckpt}", "--act", "swish"], "--act swish"),
        (["parity", "{ckpt}", "{A}", "--act", "swish"], "--act swish"),
        (["parity", "{ckpt}", "{A}", "--act", "relu", "--samples", "-1"], "--samples -1"),
        (["parity", "{ckpt}", "{A}", "--act", "relu", "--atol", "nan"], "--atol: Input should be a finite number"),
        (["bench", "{A}", "--threads", "-1"], "--threads -1"),
        (["bench", "{A}", "--seconds", "nan"], "--seconds nan"),
        (["bench", "{A}", "--batch", "100000"], "batch sizes must be 1..256"),
        (["bench", "{A}", "--plot", "{tmp}/missing/speed.png"], "no such file or folder; create it first"),
        (["bench", "{A}", "--plot", "{tmp}/speed.txt"], "use a .png, .svg, .pdf file name"),
        (["convert", "{ckpt}", *RELU, "--batch", "100000"], "--batch: Input should be less than or equal to 256"),
        (["convert", "{ckpt}", *RELU, "--crop-pct", "0.001"], "--crop-pct: Input should be greater than or equal to 0.25"),
        (["convert", "{ckpt}", "--act", "relu", "--imgsz", "100000"], "--imgsz: Input should be less than or equal to 1024"),
        (["convert", "{ckpt}", *RELU, "--dynamic", "--batch", "8"], "dynamic and batch 8 conflict"),
        (["convert", "{ckpt}", *RELU, "--std", "0,1,1"], "--std: every std must be > 0"),
        (["convert", "{ckpt}", *RELU, "--atol", "-1"], "--atol: Input should be greater than 0"),
        (["convert", "{ckpt}", *RELU, "--atol", "inf"], "--atol: Input should be a finite number"),
        (["convert", "{ckpt}", *RELU, "--samples", "0"], "--samples: Input should be greater than or equal to 1"),
        (["convert", "{tmp}/loop", *RELU], "loop: is a symlink loop"),
        (["convert", "/dev/null", *RELU], "/dev/null: is a device or pipe, not a file"),
        (["convert", "{ckpt}", *RELU, "-o", "{tmp}/loop"], "is a symlink loop"),
        (["convert", "{ckpt}", *RELU, "-o", "/dev/null"], "/dev/null: exists and is a device or pipe"),
    ],
)  # fmt: skip
def test_user_mistakes_are_one_line_naming_the_flag(small_path, small_onnx, tmp_path, args, message):
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    values = {"{ckpt}": small_path, "{A}": str(small_onnx), "{tmp}": str(tmp_path)}
    args = [next((a.replace(k, v) for k, v in values.items() if k in a), a) for a in args]
    code, stdout, stderr = cli(*args)
    assert_one_line_exit_2(code, stdout, stderr, message)
    assert "--preprocess" not in stderr and "--tolerance" not in stderr and "--calib-samples" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "loop2"]


@pytest.mark.parametrize(
    "data, message",
    [
        ("target: onnx\nimgsz: 64\nimgsz: 96\n", "imgsz: given twice (lines 2 and 3); keep one"),
        ("target: onnx\ntolerance:\n  atol: .inf\n", "tolerance.atol: Input should be a finite number"),
        ("target: onnx\ntolerance:\n  atol: .nan\n", "tolerance.atol: Input should be a finite number"),
        ('target: onnx\nimgsz: "64"\n', "imgsz: give one size or [height, width] (got '64', a str"),
        ("target: onnx\ndynamic: yes\n", {"dynamic": True}),  # YAML 1.1's own boolean: allowed
        ("target: onnx\ntolerance:\n  atol: 1e-3\n", {"tolerance": Tolerance(atol=1e-3)}),  # YAML 1.2's float
        ('target: onnx\ndynamic: "yes"\n', "dynamic: Input should be a valid boolean"),
        ("target: onnx\nbatch: 2.0\n", "batch: Input should be a valid integer (got 2.0, a float"),
        ("target: onnx\nbench:\n  batches: []\n", "bench.batches: Tuple should have at least 1 item"),
        ("target: onnx\nbench:\n  batches: [0]\n", "bench.batches.0: Input should be greater than or equal to 1"),
        ("target: onnx\nopset: 13\n", "opset: 13 is outside 18..23"),
        (b"target: onnx\ndescription: caf\xe9\n", "not UTF-8 text"),
    ],
)
def test_recipe_values_are_never_coerced_or_silently_dropped(small_path, tmp_path, data, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    if isinstance(message, dict):  # a valid recipe, read as YAML means it
        recipe = load_recipe(path)[1]
        assert all(getattr(recipe, k) == v for k, v in message.items())
        return
    code, stdout, stderr = cli("convert", small_path, "--act", "relu", "--recipe", str(path), "-o", str(tmp_path / "o"))
    assert_one_line_exit_2(code, stdout, stderr, f"{path}: {message}")


def test_hand_edited_manifests_are_bad_input(small_path, small_onnx, tmp_path):
    edits = {
        "shape_65": (lambda m: m["input"].update(shape=[1, 3, 65, 65]), "input.shape [1, 3, 65, 65] is not"),
        "shape_str": (lambda m: m["input"].update(shape=[1, 3, "64", 64]), "input.shape.2"),
        "precision": (lambda m: m.update(precision="fp12"), "precision: Input should be"),
        "interpolation": (lambda m: m["input"].update(interpolation="cubic"), "input.interpolation"),
        "missing_key": (lambda m: m.pop("sha256"), "sha256: Field required"),
        "outside": (lambda m: m.update(artifact="../A/model.onnx"), "artifact '../A/model.onnx' is not a name inside"),
        "absolute": (lambda m: m.update(artifact="/etc/hostname"), "artifact '/etc/hostname' is not a name inside"),
        "act": (lambda m: m["model"].update(act="swish"), "model: act must be one of"),
        "tolerance": (lambda m: m["recipe"]["tolerance"].update(atol="1e-3"), "recipe.tolerance.atol"),
        "no_source": (lambda m: m.pop("source"), "source: Field required"),
    }
    for name, (edit, message) in edits.items():
        art = copy_of(small_onnx, tmp_path / name)
        manifest = json.loads((art / mf.MANIFEST).read_text())
        edit(manifest)
        (art / mf.MANIFEST).write_text(json.dumps(manifest))
        for command in (["parity", small_path, str(art), "--act", "relu"], ["bench", str(art)]):
            code, stdout, stderr = cli(*command)
            assert_one_line_exit_2(code, stdout, stderr, f"{art / mf.MANIFEST}: {message}")


def test_unwritable_home_and_empty_cache_variable(small_path, tmp_path, monkeypatch):
    monkeypatch.delenv("FNEXPORT_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/dev/null")
    code, stdout, stderr = cli("convert", small_path, *RELU, "-o", str(tmp_path / "o"))
    assert_one_line_exit_2(code, stdout, stderr, "set FNEXPORT_CACHE to a writable folder")
    monkeypatch.setenv("FNEXPORT_CACHE", "")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("convert", small_path, *RELU, "-o", str(tmp_path / "o"))
    assert_one_line_exit_2(code, stdout, stderr, "FNEXPORT_CACHE is set but empty")
    assert list(tmp_path.iterdir()) == []  # nothing cached into the working directory


def test_stdout_to_a_full_disk_exits_cleanly(small_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fnexport", "inspect", small_path, "--act", "relu", "--json"],
                                cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: cannot write to stdout (No space left on device); redirect it somewhere writable"
    ]


# -- 7. what cannot be meant is refused; what was not used is not recorded --


def test_calib_is_recorded_only_when_used(small_path, tmp_path):
    out = tmp_path / "fp32"
    code, stdout, stderr = cli("convert", small_path, *RELU, "--calib", "embedded:natural", "-o", str(out), "--json")
    assert code == 0 and "--calib embedded:natural was not used: onnx fp32 does not calibrate" in said(stderr)
    assert json.loads(stdout)["recipe"]["calib"] is None and "calibration" not in mf.read(out)


def test_a_one_image_calibration_set_is_warned_and_recorded(small_ckpt, tmp_path, caplog):
    (tmp_path / "one").mkdir()
    shutil.copyfile(embedded("natural") / "coffee_1.png", tmp_path / "one" / "coffee.png")
    recipe = Recipe(target="onnx", precision="int8", imgsz=64, parity_samples=8, tolerance=ANY,
                    calib=str(tmp_path / "one"))  # fmt: skip
    _, manifest = convert(small_ckpt, recipe, tmp_path / "out")
    assert manifest["calibration"]["images"] == 1 and "calibrated on 1 image(s)" in manifest["calibration"]["warning"]
    assert "calibrated on 1 image(s)" in caplog.text


def test_parity_data_whose_classes_do_not_match_says_so(small_path, small_onnx, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        shutil.copyfile(embedded("natural") / "coffee_1.png", tmp_path / "data" / cls / "a.png")
    code, _, stderr = cli("parity", small_path, str(small_onnx), "--act", "relu", "--data", str(tmp_path / "data"))
    assert code == 0, stderr
    message = "it has 2 class folders for a 7-class model (and the model names none), so accuracy is not computed"
    assert message in said(stderr)
