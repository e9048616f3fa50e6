"""`fnexport bench`: it runs, its JSON is complete, and its numbers are positive and agree with each other."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from fnexport import manifest as mf
from fnexport.bench import bench, plot, tabulate_speed
from fnexport.cli import app
from fnexport.conversion import convert
from fnexport.errors import BadInput
from fnexport.model.checkpoint import load_checkpoint
from fnexport.model.fasternet import count
from fnexport.recipes import Recipe

ROW_KEYS = {
    "name", "backend", "precision", "batch", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99",
    "throughput_ips", "macs", "gflops", "speedup_vs_eager", "pct_of_fp32_peak",
}  # fmt: skip
ITERS = 3


@pytest.fixture(scope="module")
def artifacts(layouts, tmp_path_factory):
    """A dynamic-batch and a batch-1 ONNX artifact of the same T0, plus a TensorRT dir that cannot run on CPU."""
    root = tmp_path_factory.mktemp("bench")
    ckpt = load_checkpoint(layouts["official"])
    recipe = Recipe(target="onnx", imgsz=64, parity_samples=4)
    dynamic, _ = convert(ckpt, recipe.model_copy(update={"dynamic": True}), root / "onnx-dynamic")
    static, manifest = convert(ckpt, recipe, root / "onnx-b1")
    # A prepared-but-unbuilt TensorRT directory: its runner needs an engine, so bench must skip it.
    trt = root / "tensorrt-fp32"
    trt.mkdir()
    shutil.copy(static / "model.onnx", trt / "model.onnx")
    mf.write(trt, manifest | {"target": "tensorrt", "sha256": mf.sha256_artifact(trt / "model.onnx")})
    return dynamic, static, trt


@pytest.fixture(scope="module")
def result(layouts, artifacts, tmp_path_factory):
    plot = tmp_path_factory.mktemp("plot") / "bench.png"
    args = [str(layouts["official"]), *map(str, artifacts), "--imgsz", "64", "--batch", "1,4"]
    out = CliRunner().invoke(
        app, ["bench", *args, "--iters", str(ITERS), "--warmup", "1", "--json", "--plot", str(plot)]
    )
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout), plot


def measured(rows):
    return [r for r in rows if not r["skipped"]]


def test_json_is_complete(result):
    data, _ = result
    m = data["machine"]
    assert m["cpu"] and m["threads"] >= 1 and m["cores"] >= 1
    assert m["fp32_gemm_peak_gflops"] > 0
    assert m["other_processes_cpu_pct"] is None or 0 <= m["other_processes_cpu_pct"] <= 100
    assert {"torch", "onnxruntime"} <= set(m["versions"])
    rows = measured(data["rows"])
    # Per batch: eager, the faster reparameterized form and the dynamic artifact; batch 1 also the fixed one.
    assert sorted((r["kind"], r["batch"]) for r in rows) == sorted(
        [("eager", 1), ("eager", 4), ("reparam", 1), ("reparam", 4), ("artifact", 1), ("artifact", 4), ("artifact", 1)]
    )
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["calls"] == ITERS
        # bench runs ONNX Runtime alone, so its idle threads may spin (the gate, val and predict do not)
        assert r["kind"] != "artifact" or r["runtime"]["spinning"] is True


def test_numbers_are_positive_and_consistent(result, layouts):
    data, _ = result
    peak = data["machine"]["fp32_gemm_peak_gflops"]
    _, macs = count(load_checkpoint(layouts["official"]).model, 64)
    for r in measured(data["rows"]):
        assert r["macs"] == macs  # the manifest's count and bench's own agree
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1e3 / r["latency_ms_p50"], rel=1e-3)
        assert r["gflops"] == pytest.approx(2 * r["macs"] * r["throughput_ips"] / 1e9, rel=1e-3, abs=0.01)
        assert r["pct_of_fp32_peak"] == pytest.approx(100 * r["gflops"] / peak, rel=0.02, abs=0.1)
        assert r["speedup_vs_eager"] > 0
        if r["kind"] == "eager":
            assert r["speedup_vs_eager"] == 1
        if r["kind"] == "reparam":
            forms = r["pconv_forms_ms_p50"]
            assert set(forms) == {"slicing", "split_cat"}
            assert r["pconv_form"] == min(forms, key=forms.get)
            assert r["latency_ms_p50"] == forms[r["pconv_form"]]
        if r["kind"] == "artifact" and r["batch"] == 1:
            # Generous, same-run: ONNX Runtime is ~2x faster than eager; 5x slower would be a timing bug.
            assert r["speedup_vs_eager"] > 0.2


def test_unusable_rows_are_skipped_with_reason(result, artifacts):
    data, _ = result
    _, static, trt = artifacts
    skipped = {(r["name"], r["batch"]): r["skipped"] for r in data["rows"] if r["skipped"]}
    assert set(skipped) == {(static.name, 4), (trt.name, None)}
    assert "fixed batch of 1" in skipped[(static.name, 4)]
    assert "engine" in skipped[(trt.name, None)].lower()


def test_plot_and_markdown(result):
    data, png = result
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tabulate_speed(data)
    assert text.count("\n| ") == len(measured(data["rows"])) + 1  # header + one line per measured row
    assert "Skipped tensorrt-fp32" in text


def test_plot_uses_accuracy_when_every_point_has_one(result, tmp_path):
    data, _ = result
    rows = [r | {"accuracy": 0.9} for r in data["rows"]]
    path = plot(data | {"rows": rows}, tmp_path / "acc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_exit_2(layouts):
    out = CliRunner().invoke(app, ["bench", "fasternet_t0", "--batch", "1,x"])
    assert isinstance(out.exception, BadInput)
    with pytest.raises(BadInput, match="not both"):
        bench([str(layouts["official"])], iters=2, seconds=1.0)
    with pytest.raises(BadInput, match="batch sizes must be 1..256"):
        bench([str(layouts["official"])], batches=(0,))
