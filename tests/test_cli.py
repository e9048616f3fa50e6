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


def test_predict_json_schema_and_scores(converted, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import fnexport

    out, _ = converted
    monkeypatch.chdir(tmp_path)  # short relative names: rich does not wrap the warnings mid-name
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "sub" / "broken.jpg").write_text("not an image")
    rc, stdout, stderr = cli("predict", str(out), ".", "--top", "3", "--json")
    assert rc == 0, stderr
    assert " ".join(stderr.split()).count("broken.jpg: skipped") == 1
    doc = json.loads(stdout)
    assert list(doc) == ["predictions"] and [p["file"] for p in doc["predictions"]] == ["a.png", "sub/b.jpg"]
    with fnexport.load(out) as art:
        logits = art.predict([tmp_path / "a.png", tmp_path / "sub" / "b.jpg"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for pred, p in zip(doc["predictions"], probs, strict=True):
        assert list(pred) == ["file", "top"] and len(pred["top"]) == 3
        for entry, index in zip(pred["top"], np.argsort(-p)[:3], strict=True):
            assert list(entry) == ["index", "label", "score"] and entry["label"] is None
            assert entry["index"] == index and abs(entry["score"] - p[index]) < 1e-6
    rc, stdout, _ = cli("predict", str(out), "a.png", "--top", "2")
    assert rc == 0 and stdout.startswith("a.png: #") and stdout.count("\n") == 1


def test_predict_exit_codes(converted, tmp_path, monkeypatch):
    out, _ = converted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jpg").write_text("not an image")
    (tmp_path / "bad2.jpg").write_bytes(b"\xff\xd8 truncated")
    rc, stdout, stderr = cli("predict", str(out), "bad.jpg", "missing.png", "--json")
    assert (
        rc == 2
        and stdout == ""
        and stderr.strip() == "error: missing.png: no such file or folder; give image files or folders of images"
    )
    rc, stdout, stderr = cli("predict", str(out), "bad.jpg", "bad2.jpg", "--json")
    assert rc == 2 and stdout == "" and "no readable image" in stderr and "Traceback" not in stderr
    assert " ".join(stderr.split()).count("skipped, not a readable image") == 2
    rc, _, stderr = cli("predict", str(tmp_path), str(tmp_path / "bad.jpg"))
    assert rc == 2 and "no manifest.json" in stderr
    rc, _, stderr = cli("predict", str(out), str(tmp_path), "--top", "0")
    assert rc == 2 and "--top 0" in stderr
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the runtime is missing here
    rc, _, stderr = cli("predict", str(out), str(tmp_path / "bad.jpg"))
    assert rc == 3 and "onnxruntime is not installed" in stderr
