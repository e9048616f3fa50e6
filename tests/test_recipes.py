"""Built-in recipes convert and pass their gate; bad recipes are exit 2 naming the key; release bundles."""

import json

import pytest
import torch
import yaml

from fnexport.model.fasternet import VARIANTS, FasterNet
from fnexport.recipes import builtin_recipes, parse_recipe, recipe_data
from tests.conftest import randomize_bn
from tests.test_cli import cli

RECIPES = builtin_recipes()


def test_builtin_recipes_validate_and_are_listed():
    assert len(RECIPES) >= 6
    code, stdout, _ = cli("recipes")
    assert code == 0
    for name, path in RECIPES.items():
        recipe = parse_recipe(recipe_data(path)[1], str(path))
        assert recipe.description and recipe.variant in VARIANTS
        assert name.startswith(recipe.variant) and f"-{recipe.target}-{recipe.precision}" in name
        assert name in stdout


def test_builtin_recipes_outside_a_checkout(tmp_path, monkeypatch):
    """A wheel install (docker/tensorrt) has no recipes/ beside the package: the data-files copy is used."""
    from pathlib import Path

    import tomllib

    import fnexport.recipes as recipes

    root = Path(recipes.__file__).resolve().parents[1]
    data_files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {Path(p).stem for pattern in data_files["share/fnexport/recipes"] for p in root.glob(pattern)}
    assert shipped == set(RECIPES)
    for path in RECIPES.values():
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(recipes, "SOURCE_RECIPES", tmp_path / "absent")
    monkeypatch.setattr(recipes, "INSTALLED_RECIPES", tmp_path)
    assert builtin_recipes() == {name: tmp_path / path.name for name, path in RECIPES.items()}
    path, data = recipe_data("fasternet_t0-onnx-fp32")
    assert path.parent == tmp_path and parse_recipe(data, str(path)).target == "onnx"


@pytest.fixture(scope="module")
def variant_ckpts(tmp_path_factory):
    """T2 and S with non-trivial BN statistics (their recipes use the embedded natural images)."""
    root = tmp_path_factory.mktemp("variants")
    paths = {}
    for name in ("fasternet_t2", "fasternet_s"):
        torch.manual_seed(0)
        paths[name] = root / f"{name}.pth"
        torch.save(randomize_bn(FasterNet(VARIANTS[name])).state_dict(), paths[name])
    return paths


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_builtin_recipe_converts_and_passes_its_gate(name, digits_ckpt, digits_dirs, variant_ckpts, tmp_path):
    recipe = parse_recipe(recipe_data(RECIPES[name])[1], name)
    out = tmp_path / name
    args = ["convert", "--recipe", name, "-o", str(out)]
    if recipe.variant == "fasternet_t0":
        # The trained digits T0; flags override only where the data must be digits.
        train, test = digits_dirs
        args += [str(digits_ckpt), "--data", str(test)] + (["--calib", str(train)] if recipe.calib else [])
    else:
        args.append(str(variant_ckpts[recipe.variant]))
    code, _stdout, stderr = cli(*args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["imgsz"] == recipe.imgsz and manifest["precision"] == recipe.precision
    if recipe.target == "tensorrt":
        assert code in (0, 3), stderr  # 3: prepared here, the engine is built on the GPU host
        assert manifest["details"]["prepared_check"]["passed"]
    else:
        assert code == 0, stderr
        gate_args = ["parity", args[-1] if recipe.variant != "fasternet_t0" else str(digits_ckpt), str(out)]
        if recipe.variant == "fasternet_t0":
            gate_args += ["--data", str(digits_dirs[1]), "--samples", "64"]
        if recipe.target == "coreml":
            gate_args.append("--allow-not-run")  # Core ML predicts on macOS only
        gate_code, _, gate_err = cli(*gate_args)
        assert gate_code == 0, gate_err


def _write(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ({"target": "onnx", "precison": "fp16"}, "precison: unknown key; did you mean precision?"),
        ({"target": "onnx", "tolerance": {"atl": 1e-3}}, "tolerance.atl: unknown key; did you mean atol?"),
        ({"target": "onnx", "imgsz": "big"}, "imgsz:"),
        ({"target": "onnx", "imgsz": 200}, "imgsz: 200 is not a multiple of 32"),
        ({"target": "onnx", "precision": "int8"}, "int8 needs calibration images"),
        ({"target": "ncnn", "precision": "int8", "calib": "embedded:natural"}, "INT8 tools (ncnn2table, ncnn2int8)"),
        ({"target": "coreml", "precision": "int4", "deployment_target": "iOS16"}, "int4 weights need iOS18"),
        ({"target": "openvino", "deployment_target": "iOS18"}, "deployment_target applies only to --target coreml"),
        ({"precision": "fp32"}, "target: required"),
    ],
)
def test_bad_recipe_is_exit_2_naming_file_and_key(tmp_path, data, message, digits_ckpt):
    path = _write(tmp_path, "bad", data)
    code, stdout, stderr = cli("convert", str(digits_ckpt), "--recipe", str(path), "-o", str(tmp_path / "o"))
    assert code == 2 and str(path) in stderr and message in stderr, stderr
    assert "Traceback" not in stderr and stdout == "" and not (tmp_path / "o").exists()


def test_recipe_for_another_variant_is_refused(digits_ckpt, tmp_path):
    code, _, stderr = cli(
        "convert", str(digits_ckpt), "--recipe", "fasternet_t2-tensorrt-fp16", "-o", str(tmp_path / "o")
    )
    assert code == 2 and "is a fasternet_t0, but the recipe is for fasternet_t2" in stderr


def test_flags_override_recipe_values(digits_ckpt, digits_dirs, tmp_path):
    out = tmp_path / "o"
    code, stdout, stderr = cli("convert", str(digits_ckpt), "--recipe", "fasternet_t0-onnx-fp32", "--imgsz", "64",
                               "--crop-pct", "1.0", "--data", str(digits_dirs[1]), "-o", str(out), "--json")  # fmt: skip
    assert code == 0, stderr
    manifest = json.loads(stdout)
    assert manifest["input"]["shape"] == ["batch", 3, 64, 64]  # dynamic from the recipe, size from the flag
    assert manifest["input"]["crop_pct"] == 1.0 and manifest["input"]["interpolation"] == "bicubic"


def test_release_bundles_gates_and_marks_failures(digits_ckpt, digits_dirs, tmp_path):
    train, test = digits_dirs
    common = {"variant": "fasternet_t0", "imgsz": 64, "dynamic": True, "parity_data": str(test), "parity_samples": 100,
              "preprocess": {"crop_pct": 1.0, "interpolation": "bilinear"}}  # fmt: skip
    fast = {"batches": [1, 3], "seconds": 0.3}
    good = _write(tmp_path, "t0-onnx", {**common, "target": "onnx", "description": "fp32", "bench": fast})
    int8 = _write(
        tmp_path, "t0-ov-int8",
        {**common, "target": "openvino", "precision": "int8", "calib": str(train), "bench": fast | {"batches": [2]}},
    )  # fmt: skip
    out = tmp_path / "release"
    code, _stdout, stderr = cli(
        "release", str(digits_ckpt), "--recipe", str(good), "--recipe", str(int8), "-o", str(out), "--bench"
    )
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and [a["status"] for a in summary["artifacts"]] == ["PASS", "PASS"]
    assert (out / "t0-onnx" / "model.onnx").is_file() and (out / "t0-ov-int8" / "manifest.json").is_file()
    text = (out / "summary.md").read_text()
    assert "| t0-ov-int8 | openvino | int8 | PASS |" in text and "## Speed" in text
    # --bench: the shipped artifacts and the checkpoint, at the union of the recipes' batch sizes
    rows = json.loads((out / "bench.json").read_text())["rows"]
    timed = {(r["name"], r["batch"]) for r in rows if not r["skipped"]}
    assert {(name, b) for name in ("t0-onnx", "t0-ov-int8") for b in (1, 2, 3)} <= timed
    assert all(r["speedup_vs_eager"] > 0 and r["accuracy"] is not None for r in rows if r["kind"] == "artifact")

    strict = _write(tmp_path, "t0-strict", {**common, "target": "onnx", "tolerance": {"atol": 1e-12}})
    out2 = tmp_path / "release2"
    code, _, stderr = cli("release", str(digits_ckpt), "--recipe", str(good), "--recipe", str(strict), "-o", str(out2))
    assert code == 1 and "t0-strict" in stderr
    summary = json.loads((out2 / "summary.json").read_text())
    assert [a["status"] for a in summary["artifacts"]] == ["PASS", "FAIL"]
    assert not (out2 / "t0-strict").exists()  # never shipped under its own name
