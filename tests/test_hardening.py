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
from fnexport.conversion import convert
from fnexport.data import Preprocess, embedded, load_images
from fnexport.errors import BackendUnavailable
from fnexport.model.checkpoint import load_checkpoint
from fnexport.recipes import Recipe, Tolerance
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


def test_non_integer_imgsz_is_a_usage_error():
    code, stdout, stderr = cli("convert", "fasternet_t0", "--imgsz", "large")
    assert code == 2 and stdout == "" and "Traceback" not in stderr and "--imgsz" in stderr


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
    assert "Traceback" not in stderr
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
        (a / mf.MANIFEST).write_text("{}")
        (b / mf.MANIFEST).write_text("{}")
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
ANY = Tolerance(atol=1e3, min_cosine=-1.0, min_top1=0.0)


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
    assert "model.onnx" in a and a == b
    assert mf.read(tmp_path / "a")["sha256"] == mf.read(tmp_path / "b")["sha256"]


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
