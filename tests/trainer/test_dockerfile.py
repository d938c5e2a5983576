"""The trainer image: hadolint-clean, non-root, the right entrypoint, pins in step with pyproject."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import dockerfiles
from tests.support.dockerfiles import REPO, exact_pin

DOCKERFILE = REPO / "trainer_image" / "Dockerfile"
REQUIREMENTS = REPO / "trainer_image" / "requirements-gpu.txt"

SHARED_PINS = ("transformers", "trl", "datasets", "peft", "unsloth", "unsloth_zoo", "accelerate")


def instructions() -> list[tuple[str, str]]:
    return dockerfiles.instructions(DOCKERFILE)


def requirements_pins() -> dict[str, Requirement]:
    return dockerfiles.requirements_pins(REQUIREMENTS)


def trainer_extra() -> dict[str, Requirement]:
    return dockerfiles.pyproject_extra("trainer")


def test_hadolint_is_clean() -> None:
    assert dockerfiles.hadolint(DOCKERFILE) == (0, "")


def test_runs_as_non_root_user() -> None:
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users, "the Dockerfile has no USER instruction"
    user = users[-1].split(":", 1)[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]!r}"


def test_entrypoint_is_the_trainer_cli() -> None:
    entrypoints = [args for keyword, args in instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["loraresume-train"]']


def test_entrypoint_is_a_console_script_of_the_package() -> None:
    scripts = dockerfiles.pyproject()["project"]["scripts"]
    assert scripts["loraresume-train"] == "loraresume_trainer.cli:main"


@pytest.mark.parametrize("name", SHARED_PINS)
def test_gpu_pin_matches_pyproject_trainer_extra(name: str) -> None:
    key = canonicalize_name(name)
    gpu, extra = requirements_pins(), trainer_extra()
    assert key in gpu, f"{name} is not pinned in {REQUIREMENTS.name}"
    assert key in extra, f"{name} is not in pyproject's `trainer` extra"
    assert exact_pin(gpu[key]) == exact_pin(extra[key])


def test_gpu_torch_pin_is_below_2_15_and_inside_the_extra_range() -> None:
    torch = requirements_pins()[canonicalize_name("torch")]
    version = Version(exact_pin(torch))
    assert version < Version("2.15")
    assert trainer_extra()["torch"].specifier.contains(version)
