"""The operator image: hadolint-clean, multi-stage, non-root, the right entrypoint, pins in step
with pyproject, and a wheel of this repository that carries everything the operator imports.

No container engine runs here, so what `docker build` would prove is checked piece by piece:
the builder stage's COPY sources (filtered by .dockerignore, as the build context would be)
are copied to a temporary directory, built into a wheel the way the Dockerfile builds it,
installed with --no-deps into a target directory, and imported from there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import dockerfiles
from tests.support.dockerfiles import REPO, exact_pin

DOCKERFILE = REPO / "operator" / "Dockerfile"
REQUIREMENTS = REPO / "operator" / "requirements-image.txt"
DOCKERIGNORE = REPO / ".dockerignore"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
UID = "10001"
HEAVY = ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "datasets", "accelerate")
# The image's interpreter, for evaluating dependency markers.
IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.12", "sys_platform": "linux",
                "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}  # fmt: skip


def instructions() -> list[tuple[str, str]]:
    return dockerfiles.instructions(DOCKERFILE)


def final_stage() -> list[tuple[str, str]]:
    return dockerfiles.stages(DOCKERFILE)[-1]


def builder_stage() -> list[tuple[str, str]]:
    [builder] = [stage for stage in dockerfiles.stages(DOCKERFILE) if stage[0][1].endswith(" AS builder")]
    return builder


def image_pins() -> dict[str, Requirement]:
    return dockerfiles.requirements_pins(REQUIREMENTS)


def project_version() -> str:
    return dockerfiles.pyproject()["project"]["version"]


# --- the Dockerfile ------------------------------------------------------------------------------


def test_hadolint_is_clean() -> None:
    assert dockerfiles.hadolint(DOCKERFILE) == (0, "")


def test_base_image_is_one_exact_python_slim_bookworm_tag() -> None:
    bases = [args.split()[0] for keyword, args in instructions() if keyword == "FROM"]
    assert len(bases) >= 2, "expected a multi-stage build (builder + runtime)"
    assert len(set(bases)) == 1, f"the venv is copied between stages, so they need the same Python: {bases}"
    # An exact patch release (no floating `3.12-slim`), optionally with a digest.
    assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]


def test_runs_as_non_root_numeric_user() -> None:
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users, "the final stage has no USER instruction"
    assert users[-1] == f"{UID}:{UID}", "numeric, so the kubelet can enforce runAsNonRoot"


def test_entrypoint_is_the_operator_console_script() -> None:
    entrypoints = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["loraresume-operator"]']
    scripts = dockerfiles.pyproject()["project"]["scripts"]
    assert scripts["loraresume-operator"] == "loraresume_operator.cli:main"


def test_exposed_ports_are_the_cli_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraresume_operator import cli

    for name in ("LORARESUME_METRICS_PORT", "LORARESUME_LIVENESS"):
        monkeypatch.delenv(name, raising=False)
    args = cli._parser().parse_args([])
    liveness_port = int(re.fullmatch(r"http://0\.0\.0\.0:(\d+)/healthz", args.liveness).group(1))
    [exposed] = [args for keyword, args in final_stage() if keyword == "EXPOSE"]
    assert exposed.split() == [str(args.metrics_port), str(liveness_port)] == ["8080", "8081"]


def test_final_stage_has_no_build_tools_and_only_the_venv_from_the_builder() -> None:
    stage = final_stage()
    run = " ".join(args for keyword, args in stage if keyword == "RUN")
    for tool in ("apt-get", "apk", "pip ", "gcc", "build-essential", "setuptools", "wheel"):
        assert tool not in run, f"the final stage runs {tool!r}"
    copies = [args for keyword, args in stage if keyword in ("COPY", "ADD")]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    # The runtime venv is made without pip.
    assert "python -m venv --without-pip /opt/venv" in " ".join(args for _, args in builder_stage())


def test_oci_labels() -> None:
    labels = " ".join(args for keyword, args in final_stage() if keyword == "LABEL")
    pairs = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', labels))
    assert set(pairs) >= {f"org.opencontainers.image.{k}" for k in ("title", "description", "version", "revision",
                                                                       "source", "base.name")}  # fmt: skip
    assert pairs["org.opencontainers.image.title"] == "loraresume-operator"
    args = dict(a.split("=", 1) for keyword, a in final_stage() if keyword == "ARG" and "=" in a)
    assert pairs["org.opencontainers.image.version"] == "${VERSION}" and args["VERSION"] == project_version()
    base = final_stage()[0][1].split()[0].split("@")[0]
    assert pairs["org.opencontainers.image.base.name"] == f"docker.io/library/{base}"


def test_builder_installs_this_version_offline_from_the_wheel() -> None:
    run = " ".join(args for keyword, args in builder_stage() if keyword == "RUN")
    assert f'--no-index --find-links /wheels "loraresume[operator]=={project_version()}"' in run
    assert "--no-deps --only-binary=:all: -r /tmp/requirements-image.txt" in run
    assert "check" in run.split("&&")[-1]


def test_build_backend_pin_satisfies_the_build_system() -> None:
    run = " ".join(args for keyword, args in builder_stage() if keyword == "RUN")
    [pin] = re.findall(r"setuptools==[\w.]+", run)
    [required] = [Requirement(r) for r in dockerfiles.pyproject()["build-system"]["requires"]]
    assert required.specifier.contains(exact_pin(Requirement(pin)))
    assert Version(exact_pin(Requirement(pin))) >= Version("70.1"), "bdist_wheel lives in setuptools since 70.1"


# --- the pins --------------------------------------------------------------------------------------


def test_every_image_requirement_is_an_exact_pin() -> None:
    assert [str(r) for r in image_pins().values() if len(r.specifier) != 1 or "==" not in str(r.specifier)] == []


@pytest.mark.parametrize("source", ["operator extra", "base dependencies"])
def test_image_pins_match_pyproject(source: str) -> None:
    if source == "operator extra":
        wanted = dockerfiles.pyproject_extra("operator")
    else:
        wanted = dockerfiles.pyproject_dependencies()
    pins = image_pins()
    problems = []
    for name, req in wanted.items():
        if name not in pins:
            problems.append(f"{req.name} is not pinned in {REQUIREMENTS.name}")
            continue
        version = exact_pin(pins[name])
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            if version != specs[0].version:
                problems.append(f"{req.name}: image {version} != pyproject {specs[0].version}")
        elif not req.specifier.contains(version):
            problems.append(f"{req.name}: image {version} outside pyproject's {req.specifier}")
    assert problems == []


def test_image_pins_are_a_closed_set() -> None:
    """Each pinned package's own dependencies (for Python 3.12 on Linux) are pinned too, at versions they
    accept. Read from the installed distributions' metadata, for the packages this venv has."""
    pins = image_pins()
    missing, conflicts, unchecked = [], [], []
    for name, pin in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            unchecked.append(name)
            continue
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker and not dep.marker.evaluate({**IMAGE_PYTHON, "extra": ""}):
                continue
            key = canonicalize_name(dep.name)
            if key not in pins:
                missing.append(f"{name} needs {dep}")
            elif dist.version == exact_pin(pin) and not dep.specifier.contains(exact_pin(pins[key]), prereleases=True):
                conflicts.append(f"{name} {dist.version} needs {dep}, pinned {exact_pin(pins[key])}")
    assert (missing, conflicts) == ([], [])
    assert unchecked == [], "install the operator extra in this venv to check these"


def test_operator_extra_needs_no_training_stack() -> None:
    names = set(dockerfiles.pyproject_extra("operator")) | set(dockerfiles.pyproject_dependencies()) | set(image_pins())
    assert names.isdisjoint(canonicalize_name(h) for h in HEAVY)


# --- the build context -----------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) in file order, as the Docker CLI reads them."""
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        out.append((negated, pattern))
    return out


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**` (any number of directories), as Docker's patternmatcher."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def excluded(path: str) -> bool:
    """Whether the build context leaves out `path`: the last pattern matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, pattern in dockerignore_patterns():
        regex = _pattern_regex(pattern)
        if any(regex.match(p) for p in prefixes):
            result = not negated
    return result


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for keyword, args in dockerfiles.instructions(dockerfile):
        if keyword in ("COPY", "ADD") and "--from=" not in args:
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources.extend(words[:-1])
    return sources


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_dockerignore_keeps_every_copy_source(dockerfile: Path) -> None:
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
        files = (
            [source]
            if (REPO / source).is_file()
            else [str(p.relative_to(REPO)) for p in (REPO / source).rglob("*.py") if "__pycache__" not in p.parts]
        )
        assert files and not [f for f in files if excluded(f)], f"{source} is left out of the build context"


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", ".sandbox/x", "tests/conftest.py",
                                  "operator/loraresume_operator/__pycache__/cli.cpython-312.pyc",
                                  "trainer_image/loraresume.egg-info/PKG-INFO", "loraresume.egg-info/PKG-INFO",
                                  "demo-loss.png", "benchmarks/x.py"])  # fmt: skip
def test_dockerignore_leaves_out_local_state(path: str) -> None:
    assert excluded(path)


# --- the wheel -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel the builder stage builds, from the files its COPY instructions put in /src."""
    src = tmp_path_factory.mktemp("context") / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for keyword, args in builder_stage():
        if keyword != "COPY" or "--from=" in args or "requirements-image" in args:
            continue
        *sources, dest = shlex.split(args)
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") or dest == "./" else src / dest
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=ignore)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)
    out = tmp_path_factory.mktemp("wheels")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), "."],
        cwd=src, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [built] = out.glob("*.whl")
    assert built.name == f"loraresume-{project_version()}-py3-none-any.whl"
    return built


def test_wheel_declares_the_console_script_and_the_operator_extra(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = zf.read(info).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^loraresume-operator = loraresume_operator\.cli:main$", entry_points, re.M)
    declared = {}
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            only_with_extra = req.marker is not None and not req.marker.evaluate({**IMAGE_PYTHON, "extra": ""})
            if only_with_extra and req.marker.evaluate({**IMAGE_PYTHON, "extra": "operator"}):
                declared[canonicalize_name(req.name)] = str(req.specifier)
    expected = {n: str(r.specifier) for n, r in dockerfiles.pyproject_extra("operator").items()}
    assert declared == expected


def test_wheel_holds_the_operator_and_the_trainer_package_but_no_crds_or_sandbox(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    packages = {n.split("/")[0] for n in names if n.endswith(".py")}
    assert packages == {"loraresume_operator", "loraresume_trainer"}, "the sandbox is a development tool"
    assert not [n for n in names if n.startswith("crds/") or n.endswith((".pyc", ".egg-info"))]
    repo_modules = {str(p.relative_to(REPO / "operator")) for p in (REPO / "operator/loraresume_operator").glob("*.py")}
    assert repo_modules <= set(names), sorted(repo_modules - set(names))


_IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
import loraresume_operator
names = ["loraresume_operator." + m.name for m in pkgutil.iter_modules(loraresume_operator.__path__)]
for name in names:
    importlib.import_module(name)
ours = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0].startswith("loraresume_")}
heavy = sorted(n for n in sys.modules if n.split(".")[0] in HEAVY)
print(json.dumps({"modules": ours, "heavy": heavy, "cwd_files": os.listdir(".")}))
"""


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return target


def run_isolated(target: Path, code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python without site processing (so no editable install of this repository), the installed wheel
    first on the path, then this venv's site-packages for the third-party dependencies."""
    path = os.pathsep.join([str(target), *site.getsitepackages()])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LORARESUME_"))}
    return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**env, "PYTHONPATH": path})  # fmt: skip


def test_packaged_operator_imports_from_the_wheel_alone(installed: Path, tmp_path: Path) -> None:
    result = run_isolated(installed, f"HEAVY = {HEAVY!r}\n" + _IMPORT_ALL, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    modules = report["modules"]
    outside = {n: f for n, f in modules.items() if f is None or not f.startswith(str(installed))}
    assert outside == {}, "imported from outside the installed wheel"
    # The trainer modules the operator relies on came along (the import graph decides which).
    trainer = {n for n in modules if n.startswith("loraresume_trainer.")}
    assert {"loraresume_trainer.config", "loraresume_trainer.checkpoint_store", "loraresume_trainer.s3uri"} <= trainer
    assert report["heavy"] == [], "the operator image has no training stack"
    assert report["cwd_files"] == [], "ran without the repository (no crds/) beside it"


def test_packaged_console_script_runs(installed: Path, tmp_path: Path) -> None:
    code = "import sys; from loraresume_operator.cli import main; sys.argv[0] = 'loraresume-operator'; sys.exit(main())"
    result = run_isolated(installed, code, tmp_path, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--all-namespaces" in result.stdout and "--metrics-port" in result.stdout
