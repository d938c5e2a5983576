"""The attempt plan (pure): what to download, where to start, what counts as finished. Table tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loraresume_trainer.attempt_plan import (
    AttemptPlan,
    CheckpointState,
    Download,
    StoreView,
    plan_attempt,
    plan_prefetch,
    plan_start,
    refuse_early,
    saved_fingerprints,
)
from loraresume_trainer.config import JobConfig, parse_job
from loraresume_trainer.errors import ConfigError, ResumeRefused, TrainerError
from loraresume_trainer.grad_checkpointing import FINGERPRINT_KEY
from loraresume_trainer.resume_plan import Candidate, ResumeMode, ResumePlan
from tests.trainer.test_resume_plan import ckpt
from tests.trainer.test_resume_plan import fp as resume_fp


def fp(**overrides: Any) -> dict[str, Any]:
    """test_resume_plan's fingerprint, with the gradient-checkpointing mode a run records."""
    return {**resume_fp(**overrides), FINGERPRINT_KEY: "unsloth"}


def job(**fields: Any) -> JobConfig:
    doc: dict[str, Any] = {"baseModel": "m", "dataset": {"source": "d.jsonl"}, "storage": {"uri": "s3://bkt/job/"}}
    doc.update(fields)
    return parse_job(doc)


CURRENT = fp()
OTHER = fp(seed=1)  # another job under the same prefix
SHORT = fp(max_steps=10)  # a finished shorter run, for extensions
OLD = ckpt(10, SHORT, job="old")

# ------------------------------------------------------------------------------------------ prefetch

PREFETCH = [
    # (job fields, store view, inputs fetched?, expected downloads, expected checkpoint)
    pytest.param({}, StoreView(), True, [], None, id="local-inputs-fresh-job"),
    pytest.param(
        {"baseModel": "s3://bkt/base/", "adapter": "s3://bkt/ad/", "dataset": {"source": "s3://bkt/d.jsonl"}},
        StoreView(),
        True,
        [("base", "s3://bkt/base/"), ("adapter", "s3://bkt/ad/"), ("dataset", "s3://bkt/d.jsonl")],
        None,
        id="s3-inputs",
    ),
    pytest.param(
        {"baseModel": "s3://bkt/base/"}, StoreView(), False, [], None, id="engine-without-inputs-fetches-none"
    ),
    pytest.param(
        {"baseModel": "unsloth/llama-3-8b-bnb-4bit"}, StoreView(), True, [], None, id="hub-id-is-not-downloaded"
    ),
    pytest.param(
        {}, StoreView((ckpt(20, CURRENT), ckpt(10, CURRENT))), True, [], ckpt(20, CURRENT), id="relaunch-newest"
    ),
    pytest.param({}, StoreView(explicit=OLD), True, [], OLD, id="explicit-only"),
    pytest.param(
        {},
        StoreView((ckpt(20, CURRENT), ckpt(5, CURRENT)), explicit=OLD),
        True,
        [],
        ckpt(20, CURRENT),
        id="own-newer-than-explicit",
    ),
    pytest.param({}, StoreView((ckpt(5, CURRENT),), explicit=OLD), True, [], OLD, id="explicit-newer-than-own"),
    pytest.param(
        {}, StoreView((ckpt(20, CURRENT),), adapter_fingerprint=CURRENT), True, [], None, id="adapter-done-no-ckpt"
    ),
]


@pytest.mark.parametrize(("fields", "view", "inputs", "downloads", "checkpoint"), PREFETCH)
def test_plan_prefetch(
    fields: dict[str, Any],
    view: StoreView,
    inputs: bool,
    downloads: list[tuple[str, str]],
    checkpoint: Candidate | None,
) -> None:
    plan = plan_prefetch(job(**fields), view, inputs=inputs)
    assert [(d.kind, d.source) for d in plan.inputs] == downloads
    assert all(isinstance(d, Download) and d.field for d in plan.inputs)
    assert plan.checkpoint == checkpoint


# ------------------------------------------------------------------------------------------ attempt

ATTEMPTS = [
    # (job fields, store view, current fingerprint, done?, mode, candidate steps in order, foreign steps)
    pytest.param({}, StoreView(), CURRENT, False, ResumeMode.FRESH, [], [], id="fresh"),
    pytest.param(
        {},
        StoreView((ckpt(20, CURRENT), ckpt(10, CURRENT))),
        CURRENT,
        False,
        ResumeMode.EXACT,
        [20, 10],
        [],
        id="relaunch",
    ),
    pytest.param(
        {},
        StoreView((ckpt(20, CURRENT),), adapter_fingerprint=CURRENT),
        CURRENT,
        True,
        ResumeMode.FRESH,
        [],
        [],
        id="adapter-complete",
    ),
    pytest.param(
        {},
        StoreView((ckpt(30, OTHER), ckpt(20, CURRENT))),
        CURRENT,
        False,
        ResumeMode.EXACT,
        [20],
        [30],
        id="foreign-newest-skipped",
    ),
    pytest.param(
        {"resume": {"fromCheckpoint": OLD.uri, "warmStart": True}},
        StoreView(explicit=OLD),
        CURRENT,
        False,
        ResumeMode.WARM,
        [10],
        [],
        id="warm-start",
    ),
    pytest.param(
        {"resume": {"fromCheckpoint": OLD.uri, "extend": True}},
        StoreView(explicit=OLD),
        CURRENT,
        False,
        ResumeMode.EXACT,
        [10],
        [],
        id="extend",
    ),
    pytest.param(
        {},
        StoreView(adapter_fingerprint=CURRENT, explicit_error=ConfigError("gone", field="resume.fromCheckpoint")),
        CURRENT,
        True,
        ResumeMode.FRESH,
        [],
        [],
        id="done-ignores-a-vanished-fromCheckpoint",
    ),
]


@pytest.mark.parametrize(("fields", "view", "current", "done", "mode", "steps", "foreign"), ATTEMPTS)
def test_plan_attempt(
    fields: dict[str, Any],
    view: StoreView,
    current: dict[str, Any],
    done: bool,
    mode: ResumeMode,
    steps: list[int],
    foreign: list[int],
) -> None:
    plan = plan_attempt(job(**fields), view, current, adapter_uri="s3://bkt/job/adapter/")
    assert plan.done is done
    assert plan.resume.mode is mode
    assert [c.step for c in plan.resume.candidates] == steps
    assert [c.step for c in plan.resume.foreign] == foreign


REFUSALS = [
    pytest.param(StoreView(adapter_fingerprint=OTHER), {}, ResumeRefused, "already holds the finished adapter"),
    pytest.param(StoreView((ckpt(20, OTHER),)), {}, ResumeRefused, "the job changed since it was saved"),
    pytest.param(
        StoreView(explicit_error=ConfigError("not a complete checkpoint", field="resume.fromCheckpoint")),
        {},
        ConfigError,
        "resume.fromCheckpoint: not a complete checkpoint",
    ),
    pytest.param(
        StoreView(explicit=ckpt(10, fp(seed=9), job="old")),
        {"resume": {"fromCheckpoint": OLD.uri, "extend": True}},
        ResumeRefused,
        "cannot extend",
    ),
]


@pytest.mark.parametrize(("view", "fields", "error", "match"), REFUSALS)
def test_plan_attempt_refuses(view: StoreView, fields: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan_attempt(job(**fields), view, CURRENT, adapter_uri="s3://bkt/job/adapter/")


@pytest.mark.parametrize(
    ("view", "refused"),
    [
        pytest.param(StoreView(explicit_error=ConfigError("no manifest", field="resume.fromCheckpoint")), True),
        pytest.param(
            StoreView(adapter_fingerprint=CURRENT, explicit_error=ConfigError("gone", field="resume.fromCheckpoint")),
            False,
            id="adapter-complete",
        ),
        pytest.param(StoreView(explicit=OLD), False, id="usable"),
    ],
)
def test_refuse_early(view: StoreView, refused: bool) -> None:
    if refused:
        with pytest.raises(ConfigError, match=r"resume\.fromCheckpoint"):
            refuse_early(view)
    else:
        refuse_early(view)


# ------------------------------------------------------------------------------------------ start

DIR = Path("/scratch/resume/checkpoint")


def state(step: int, max_steps: int = 30, epoch: float = 1.0) -> CheckpointState:
    return CheckpointState(global_step=step, max_steps=max_steps, epoch=epoch)


def exact(*cands: Candidate, foreign: tuple[Candidate, ...] = (), extends: Candidate | None = None) -> AttemptPlan:
    return AttemptPlan(False, ResumePlan(ResumeMode.EXACT, cands, foreign, extends=extends))


STARTS = [
    # (plan, current fingerprint, fetched (candidate, state) or None, mode, step, resume dir?, extending, finished)
    pytest.param(AttemptPlan(False), CURRENT, None, ResumeMode.FRESH, 0, False, False, False, id="fresh"),
    pytest.param(
        exact(ckpt(20, CURRENT)),
        CURRENT,
        (ckpt(20, CURRENT), state(20)),
        ResumeMode.EXACT,
        20,
        True,
        False,
        False,
        id="exact",
    ),
    pytest.param(
        exact(ckpt(30, CURRENT)),
        CURRENT,
        (ckpt(30, CURRENT), state(30)),
        ResumeMode.EXACT,
        30,
        True,
        False,
        True,
        id="killed-after-the-last-checkpoint",
    ),
    pytest.param(
        exact(OLD, extends=OLD),
        CURRENT,
        (OLD, state(10, 10)),
        ResumeMode.EXACT,
        10,
        True,
        True,
        False,
        id="extend-a-finished-run",
    ),
    pytest.param(
        AttemptPlan(False, ResumePlan(ResumeMode.WARM, (OLD,))),
        CURRENT,
        (OLD, state(10, 10)),
        ResumeMode.WARM,
        0,
        False,
        False,
        False,
        id="warm-start-trains-from-step-0",
    ),
    pytest.param(
        exact(ckpt(12, fp(max_steps=-1))),
        fp(max_steps=-1),
        (ckpt(12, fp(max_steps=-1)), state(12, 12, 3.0)),
        ResumeMode.EXACT,
        12,
        True,
        False,
        True,
        id="by-epochs-the-checkpoints-total-counts",
    ),
]


@pytest.mark.parametrize(("plan", "current", "fetched", "mode", "step", "resumes", "extending", "finished"), STARTS)
def test_plan_start(
    plan: AttemptPlan,
    current: dict[str, Any],
    fetched: tuple[Candidate, CheckpointState] | None,
    mode: ResumeMode,
    step: int,
    resumes: bool,
    extending: bool,
    finished: bool,
) -> None:
    got = plan_start(
        plan, current, (fetched[0], DIR, fetched[1]) if fetched else None, checkpoints_uri="s3://bkt/job/checkpoints/"
    )
    assert (got.mode, got.step, got.extending, got.finished) == (mode, step, extending, finished)
    assert got.resume_dir == (DIR if resumes else None)
    assert got.warm_adapter == ((DIR, fetched[0].uri) if fetched and mode is ResumeMode.WARM else None)


def test_plan_start_never_starts_over_on_top_of_checkpoints_that_did_not_verify() -> None:
    with pytest.raises(TrainerError, match=r"none of the 2 complete checkpoints under s3://bkt/job/checkpoints/"):
        plan_start(
            exact(ckpt(20, CURRENT), ckpt(10, CURRENT)), CURRENT, None, checkpoints_uri="s3://bkt/job/checkpoints/"
        )


def test_plan_start_refuses_a_warm_start_in_place_over_another_jobs_checkpoints() -> None:
    plan = AttemptPlan(False, ResumePlan(ResumeMode.WARM, (ckpt(10, OTHER),), (ckpt(20, OTHER),)))
    with pytest.raises(ResumeRefused, match="would overwrite checkpoint-20"):
        plan_start(plan, CURRENT, (ckpt(10, OTHER), DIR, state(10)), checkpoints_uri="s3://bkt/job/checkpoints/")


@pytest.mark.parametrize(("epochs_done", "refused"), [(2.0, False), (3.0, True), (3.5, True)])
def test_plan_start_checks_an_extension_by_epochs_against_the_trainer_state(epochs_done: float, refused: bool) -> None:
    current = fp(max_steps=-1, num_train_epochs=3.0)
    cand = ckpt(10, fp(max_steps=-1, num_train_epochs=2.0), job="old")
    fetched = (cand, DIR, state(10, 10, epoch=epochs_done))
    if refused:
        with pytest.raises(ResumeRefused, match=f"num_train_epochs 3 does not go past .* {epochs_done:g} epochs"):
            plan_start(exact(cand, extends=cand), current, fetched, checkpoints_uri="s3://bkt/job/checkpoints/")
    else:
        start = plan_start(exact(cand, extends=cand), current, fetched, checkpoints_uri="s3://bkt/job/checkpoints/")
        assert start.extending and not start.finished and start.step == 10


# ------------------------------------------------------------------------- kept checkpointing mode


@pytest.mark.parametrize(
    ("view", "extend", "expected"),
    [
        pytest.param(StoreView(), False, [], id="nothing-saved"),
        pytest.param(
            StoreView((ckpt(20, CURRENT),), adapter_fingerprint=OTHER), False, [OTHER, CURRENT], id="adapter-first"
        ),
        pytest.param(StoreView(explicit=OLD), False, [SHORT], id="explicit-when-nothing-of-its-own"),
        pytest.param(StoreView(explicit=OLD), True, [{**SHORT, "max_steps": 30}], id="extension-with-the-jobs-length"),
        pytest.param(StoreView((ckpt(5, CURRENT),), explicit=OLD), False, [CURRENT], id="own-match-wins"),
    ],
)
def test_saved_fingerprints(view: StoreView, extend: bool, expected: list[dict[str, Any]]) -> None:
    current = {k: v for k, v in CURRENT.items() if k != FINGERPRINT_KEY}
    assert saved_fingerprints(view, current, extend=extend) == expected
