"""The CLI contract: exit codes, stdout only machine output, one-line errors without tracebacks."""

import json
import sys

import pytest
from typer.testing import CliRunner

from fnexport.cli import app, main

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    """Run main() as the console script does; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["fnexport", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def converted(layouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "t0"
    code, stdout, _ = cli("convert", str(layouts["official"]), "--imgsz", "64", "--out", str(out), "--json")
    assert code == 0
    return out, json.loads(stdout)


def test_convert_json_on_stdout(converted):
    out, manifest = converted
    assert manifest["target"] == "onnx" and manifest["artifact"] == "model.onnx"
    assert manifest["input"]["shape"] == [1, 3, 64, 64]
    for key in ("variant", "embed_dim", "depths", "num_classes", "act", "n_div"):
        assert key in manifest["model"]
    for key in ("fnexport", "torch", "onnx", "onnxruntime"):
        assert key in manifest["versions"]
    assert json.loads((out / "manifest.json").read_text())["sha256"] == manifest["sha256"]


def test_convert_prints_the_artifact_path(layouts, tmp_path):
    code, stdout, stderr = cli(
        "convert",
        str(layouts["timm"]),
        "--imgsz",
        "64",
        "-o",
        str(tmp_path / "x"),
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--crop-pct",
        "1.0",
        "--interpolation",
        "bilinear",
    )
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "x" / "model.onnx")
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["input"]["mean"] == [0.5, 0.5, 0.5] and manifest["input"]["interpolation"] == "bilinear"
    assert "Parity onnx fp32" in stderr


def test_inspect_json(layouts):
    code, stdout, _ = cli("inspect", str(layouts["lightning"]), "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["variant"] == "fasternet_t0" and info["act"] == "gelu" and info["depths"] == [1, 2, 8, 2]
    assert abs(info["params"] - 3.905e6) < 1e5 and abs(info["macs"] - 0.3354e9) < 1e7
    assert info["modules"]["before"]["BatchNorm2d"] == 17 and "BatchNorm2d" not in info["modules"]["after"]


def test_inspect_graph_counts_ops(layouts):
    code, stdout, _ = cli("inspect", str(layouts["official"]), "--imgsz", "64", "--graph", "--json")
    assert code == 0
    ops = json.loads(stdout)["onnx_ops"]
    assert ops["plain"].get("ScatterND", 0) == 13  # the official `slicing` inference form
    assert "ScatterND" not in ops["fnexport"] and "BatchNormalization" not in ops["fnexport"]
    assert sum(ops["fnexport"].values()) < sum(ops["plain"].values())


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["convert", "nope.pth"], 2, "nope.pth: no such file"),
        (["convert", "fasternet_t0", "--imgsz", "100"], 2, "multiple of 32"),
        (["convert", "fasternet_t0", "--imgsz", "16"], 2, "imgsz"),
        (["convert", "fasternet_t0", "--target", "tflite"], 2, "unknown target"),
        (["convert", "fasternet_t0", "--precision", "fp8"], 2, "precision"),
        (["convert", "fasternet_t0", "--mean", "1,2"], 2, "three comma-separated"),
        (["convert", "fasternet_t0", "--data", "/nonexistent-dir"], 2, "not a folder"),
        (["inspect"], 2, "Missing argument"),
        (["doctor", "--require", "nosuchbackend"], 2, "unknown backend"),
    ],
)
def test_bad_input_exit_2_without_traceback(args, code, message):
    rc, stdout, stderr = cli(*args)
    assert rc == code
    assert message in stderr
    assert "Traceback" not in stderr and stdout == ""


def test_truncated_checkpoint_exit_2(layouts, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(layouts["official"].read_bytes()[:5000])
    rc, _, stderr = cli("convert", str(cut), "-o", str(tmp_path / "o"))
    assert rc == 2 and "cut.pth: truncated" in stderr and "Traceback" not in stderr
    assert stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_parity_failure_exit_1(layouts, tmp_path):
    rc, _, stderr = cli(
        "convert", str(layouts["official"]), "--imgsz", "64", "--atol", "1e-12", "-o", str(tmp_path / "o")
    )
    assert rc == 1 and "parity failed" in stderr
    assert not (tmp_path / "o").exists()


def test_missing_backend_exit_3(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails as if not installed
    from fnexport.console import require
    from fnexport.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"pip install 'fnexport\[onnx\]'"):
        require("onnxruntime", "onnx")


def test_doctor_lists_backends_and_require_exit_3():
    rc, stdout, _ = cli("doctor", "--json")
    assert rc == 0
    rows = {r["backend"]: r for r in json.loads(stdout)}
    assert rows["onnxruntime"]["installed"] and rows["onnxruntime"]["version"]
    rc, _, stderr = cli("doctor", "--require", "onnxruntime,tensorrt")
    if rows["tensorrt"]["usable"]:
        assert rc == 0
    else:
        assert rc == 3 and "tensorrt" in stderr


def test_internal_error_exit_4(monkeypatch, layouts):
    import fnexport.cli

    def boom(*a, **k):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(fnexport.cli, "inspect", boom)
    rc, _, stderr = cli("inspect", str(layouts["official"]))
    assert rc == 4 and "Traceback" in stderr and "please report" in stderr


def test_app_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("convert", "inspect", "doctor", "demo"):
        assert command in result.stdout
