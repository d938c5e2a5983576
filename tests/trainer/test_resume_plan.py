"""Resume planning (pure) and the fingerprints/hashes it compares."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from loraresume_trainer.attempt_plan import training_finished
from loraresume_trainer.checkpoint_store import read_checkpoint_state
from loraresume_trainer.config import parse_job
from loraresume_trainer.errors import ConfigError, ResumeRefused
from loraresume_trainer.fingerprint import (
    fingerprint_diff,
    make_fingerprint,
    tensors_sha256,
    texts_sha256,
)
from loraresume_trainer.resume_plan import (
    Candidate,
    ResumeMode,
    ResumePlan,
    check_extension,
    plan_resume,
    refuse_other_adapter,
    refuse_overwriting_foreign,
)

LORA = {
    "r": 16,
    "alpha": 16,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
    "bias": "none",
    "use_rslora": False,
}


TRAINING = {"learning_rate": 2e-4, "optim": "adamw_8bit", "warmup_steps": 5, "save_steps": 10}


def fp(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        base_model="tiny",
        dataset_sha256="a" * 64,
        template="alpaca",
        max_seq_length=512,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=30,
        num_train_epochs=3.0,
        seed=3407,
        lora=LORA,
        training=TRAINING,
    )
    lora_overrides = overrides.pop("lora", {})
    values.update(overrides)
    values["lora"] = {**LORA, **lora_overrides}
    return make_fingerprint(**values)


CURRENT = fp()
OTHER = fp(max_steps=40)


def ckpt(step: int, fingerprint: dict[str, Any], job: str = "job") -> Candidate:
    return Candidate(step, f"s3://bkt/{job}/checkpoints/checkpoint-{step}/", fingerprint)


def roundtrip(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """As read back from a manifest in S3."""
    return json.loads(json.dumps(fingerprint))


# --- plan_resume ---------------------------------------------------------------------------

PLANS = [
    # (complete newest first, explicit, warm_start, mode, candidate URIs in order)
    pytest.param([], None, False, ResumeMode.FRESH, [], id="no-checkpoints-fresh"),
    pytest.param([], None, True, ResumeMode.FRESH, [], id="no-checkpoints-warm-start-still-fresh"),
    pytest.param(
        [ckpt(30, CURRENT), ckpt(20, CURRENT), ckpt(10, CURRENT)],
        None,
        False,
        ResumeMode.EXACT,
        [ckpt(30, CURRENT).uri, ckpt(20, CURRENT).uri, ckpt(10, CURRENT).uri],
        id="matching-newest-exact-all-newest-first",
    ),
    pytest.param(
        [ckpt(30, roundtrip(CURRENT))],
        None,
        False,
        ResumeMode.EXACT,
        [ckpt(30, CURRENT).uri],
        id="fingerprint-read-back-from-json-matches",
    ),
    pytest.param(
        [ckpt(30, OTHER), ckpt(20, CURRENT), ckpt(10, CURRENT)],
        None,
        False,
        ResumeMode.EXACT,
        [ckpt(20, CURRENT).uri, ckpt(10, CURRENT).uri],
        id="non-matching-newer-exact-from-matching-older",
    ),
    pytest.param(
        [ckpt(30, OTHER), ckpt(20, CURRENT)],
        None,
        True,
        ResumeMode.EXACT,
        [ckpt(20, CURRENT).uri],
        id="warm-start-ignored-when-one-matches",
    ),
    pytest.param(
        [ckpt(30, CURRENT)],
        ckpt(10, CURRENT, job="other"),
        False,
        ResumeMode.EXACT,
        [ckpt(30, CURRENT).uri, ckpt(10, CURRENT, job="other").uri],
        id="own-newer-checkpoint-beats-explicit-start",
    ),
    pytest.param(
        [ckpt(8, CURRENT)],
        ckpt(10, CURRENT, job="other"),
        False,
        ResumeMode.EXACT,
        [ckpt(10, CURRENT, job="other").uri, ckpt(8, CURRENT).uri],
        id="explicit-first-when-newer",
    ),
    pytest.param(
        [],
        ckpt(10, CURRENT, job="other"),
        False,
        ResumeMode.EXACT,
        [ckpt(10, CURRENT, job="other").uri],
        id="explicit-only",
    ),
    pytest.param(
        [ckpt(30, CURRENT), ckpt(20, CURRENT)],
        ckpt(20, CURRENT),
        False,
        ResumeMode.EXACT,
        [ckpt(30, CURRENT).uri, ckpt(20, CURRENT).uri],
        id="explicit-also-complete-listed-once",
    ),
    pytest.param(
        [ckpt(30, CURRENT)],
        ckpt(10, OTHER, job="other"),
        False,
        ResumeMode.EXACT,
        [ckpt(30, CURRENT).uri],
        id="explicit-non-matching-skipped-for-matching",
    ),
    pytest.param(
        [ckpt(30, OTHER), ckpt(20, fp(seed=1))],
        None,
        True,
        ResumeMode.WARM,
        [ckpt(30, OTHER).uri, ckpt(20, OTHER).uri],
        id="all-non-matching-warm-all-candidates",
    ),
    pytest.param(
        [ckpt(5, OTHER)],
        ckpt(10, OTHER, job="other"),
        True,
        ResumeMode.WARM,
        [ckpt(10, OTHER, job="other").uri, ckpt(5, OTHER).uri],
        id="warm-explicit-first",
    ),
]


@pytest.mark.parametrize(("complete", "explicit", "warm_start", "mode", "uris"), PLANS)
def test_plan_resume(
    complete: list[Candidate], explicit: Candidate | None, warm_start: bool, mode: ResumeMode, uris: list[str]
) -> None:
    plan = plan_resume(complete, CURRENT, explicit=explicit, warm_start=warm_start)
    assert plan.mode is mode
    assert [c.uri for c in plan.candidates] == uris


def test_exact_candidates_keep_their_steps_and_fingerprints() -> None:
    plan = plan_resume([ckpt(30, OTHER), ckpt(20, CURRENT)], CURRENT)
    assert plan.candidates == (ckpt(20, CURRENT),)


REFUSALS = [
    # (saved fingerprint, substrings of the message in order)
    pytest.param(fp(max_steps=30), fp(max_steps=40), ["max_steps: 30 -> 40"], id="max_steps"),
    pytest.param(
        fp(dataset_sha256="b" * 64),
        CURRENT,
        [f"dataset content: {'b' * 12} -> {'a' * 12} (different rows or order)"],
        id="dataset",
    ),
    pytest.param(fp(lora={"r": 8}), CURRENT, ["lora.r: 8 -> 16"], id="lora.r"),
    pytest.param(
        fp(lora={"target_modules": ["q_proj"]}),
        CURRENT,
        ["lora.target_modules: ['q_proj'] -> ['q_proj', 'v_proj']"],
        id="lora.target_modules",
    ),
    pytest.param(fp(base_model="other"), CURRENT, ["base_model: 'other' -> 'tiny'"], id="base_model"),
    pytest.param(fp(template="chat"), CURRENT, ["template: 'chat' -> 'alpaca'"], id="template"),
    pytest.param(fp(num_train_epochs=1), CURRENT, ["num_train_epochs: 1.0 -> 3.0"], id="num_train_epochs"),
    pytest.param(
        fp(max_steps=30, dataset_sha256="b" * 64, seed=1),
        fp(max_steps=40),
        ["dataset content: bbbbbbbbbbbb -> aaaaaaaaaaaa", "; max_steps: 30 -> 40", "; seed: 1 -> 3407"],
        id="several-in-key-order",
    ),
]


@pytest.mark.parametrize(("saved", "current", "parts"), REFUSALS)
def test_refused_lists_every_change(saved: dict[str, Any], current: dict[str, Any], parts: list[str]) -> None:
    older = ckpt(10, saved)
    newest = ckpt(20, saved)
    with pytest.raises(ResumeRefused) as info:
        plan_resume([newest, older], current)
    message = str(info.value)
    assert message.startswith(f"cannot resume exactly from {newest.uri}: the job changed since it was saved (")
    position = 0
    for part in parts:
        position = message.index(part, position) + len(part)  # present, in this order
    assert "resume.warmStart: true" in message and "resume.extend: true" in message
    assert "storage.uri" in message


def test_refusal_names_the_explicit_checkpoint() -> None:
    explicit = ckpt(5, OTHER, job="other")
    with pytest.raises(ResumeRefused) as info:
        plan_resume([ckpt(3, fp(seed=1))], CURRENT, explicit=explicit)
    message = str(info.value)
    assert f"cannot resume exactly from {explicit.uri}:" in message
    assert "max_steps: 40 -> 30" in message
    assert "seed" not in message  # only the explicit (first) candidate's changes are listed


def test_refusal_is_a_permanent_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        plan_resume([ckpt(10, OTHER)], CURRENT)
    assert isinstance(info.value, ResumeRefused)
    assert info.value.permanent is True


# --- fingerprint_diff / make_fingerprint ---------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "current", "changes"),
    [
        pytest.param(CURRENT, fp(), [], id="equal"),
        pytest.param(
            fp(max_steps=30, per_device_train_batch_size=1),
            fp(max_steps=60),
            ["per_device_train_batch_size: 1 -> 2", "max_steps: 30 -> 60"],
            id="fingerprint-key-order",
        ),
        pytest.param(
            {**CURRENT, "zeta": 1, "alpha_extra": 2},
            CURRENT,
            ["alpha_extra: 2 -> (not set)", "zeta: 1 -> (not set)"],
            id="unknown-keys-sorted-last",
        ),
        pytest.param(
            fp(lora={"alpha": 32, "use_rslora": True}),
            CURRENT,
            ["lora.alpha: 32 -> 16", "lora.use_rslora: True -> False"],
            id="lora-sub-fields",
        ),
        pytest.param(
            fp(base_model="m" * 100),
            CURRENT,
            ["base_model: '" + "m" * 76 + "... -> 'tiny'"],
            id="long-value-shortened",
        ),
    ],
)
def test_fingerprint_diff(saved: dict[str, Any], current: dict[str, Any], changes: list[str]) -> None:
    assert fingerprint_diff(saved, current) == changes


def test_target_modules_order_is_irrelevant() -> None:
    a = fp(lora={"target_modules": ["v_proj", "q_proj", "o_proj"]})
    b = fp(lora={"target_modules": ("o_proj", "q_proj", "v_proj")})
    assert a == b
    assert a["lora"]["target_modules"] == ["o_proj", "q_proj", "v_proj"]


def test_make_fingerprint_does_not_touch_its_input() -> None:
    lora = {**LORA, "target_modules": ["v_proj", "q_proj"]}
    training = {"save_steps": 3, "learning_rate": 1.0}
    make_fingerprint(
        base_model="m",
        dataset_sha256="x",
        template="alpaca",
        max_seq_length=8,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=1,
        num_train_epochs=1,
        seed=0,
        lora=lora,
        training=training,
    )
    assert lora["target_modules"] == ["v_proj", "q_proj"]
    assert training == {"save_steps": 3, "learning_rate": 1.0}


def test_make_fingerprint_normalises_number_types_and_survives_json() -> None:
    a = fp(max_steps="30", num_train_epochs=3, max_seq_length=512.0)
    assert a == CURRENT
    assert isinstance(a["num_train_epochs"], float) and isinstance(a["max_steps"], int)
    assert roundtrip(a) == a


# --- texts_sha256 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        pytest.param(["x", "y"], ["x", "y"], True, id="same-rows-same-hash"),
        pytest.param(["x", "y"], ("x", "y"), True, id="any-iterable"),
        pytest.param(["x", "y"], ["y", "x"], False, id="row-order"),
        pytest.param(["ab", "c"], ["a", "bc"], False, id="row-boundaries"),
        pytest.param(["abc"], ["ab", "c"], False, id="split-row"),
        pytest.param([], [""], False, id="empty-vs-one-empty-row"),
        pytest.param(["x"], ["x", ""], False, id="trailing-empty-row"),
        pytest.param(["é"], ["e\u0301"], False, id="unicode-normal-forms-differ"),
    ],
)
def test_texts_sha256(a: list[str], b: list[str], same: bool) -> None:
    assert (texts_sha256(a) == texts_sha256(b)) is same


def test_texts_sha256_is_hex_sha256() -> None:
    digest = texts_sha256(["x"])
    assert len(digest) == 64 and int(digest, 16) >= 0


# --- tensors_sha256 ------------------------------------------------------------------------


def base_tensors() -> dict[str, torch.Tensor]:
    return {
        "a.lora_A.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
        "a.lora_B.weight": torch.ones(4, 3, dtype=torch.float32),
    }


def flip_lowest_bit(t: torch.Tensor) -> torch.Tensor:
    bits = t.clone().view(torch.int32)
    bits.view(-1)[5] ^= 1
    return bits.view(torch.float32)


TENSOR_CHANGES = [
    # (change to base_tensors(), hash stays equal)
    pytest.param(lambda d: d, True, id="copy-equal"),
    pytest.param(lambda d: dict(reversed(list(d.items()))), True, id="name-order-irrelevant"),
    pytest.param(
        lambda d: {**d, "a.lora_A.weight": d["a.lora_A.weight"].T.contiguous().T}, True, id="non-contiguous-same-values"
    ),
    pytest.param(
        lambda d: {**d, "a.lora_B.weight": d["a.lora_B.weight"].requires_grad_()}, True, id="requires-grad-irrelevant"
    ),
    pytest.param(lambda d: {**d, "a.lora_A.weight": flip_lowest_bit(d["a.lora_A.weight"])}, False, id="single-bit"),
    pytest.param(
        lambda d: {**d, "a.lora_B.weight": d["a.lora_B.weight"].view(torch.int32)}, False, id="dtype-same-bytes"
    ),
    pytest.param(lambda d: {**d, "a.lora_B.weight": d["a.lora_B.weight"].double()}, False, id="dtype-same-values"),
    pytest.param(lambda d: {**d, "a.lora_B.weight": d["a.lora_B.weight"].reshape(3, 4)}, False, id="shape"),
    pytest.param(
        lambda d: {"b.lora_A.weight": d["a.lora_A.weight"], "a.lora_B.weight": d["a.lora_B.weight"]}, False, id="name"
    ),
    pytest.param(lambda d: {"a.lora_A.weight": d["a.lora_A.weight"]}, False, id="missing-tensor"),
]


@pytest.mark.parametrize(("change", "same"), TENSOR_CHANGES)
def test_tensors_sha256(change: Any, same: bool) -> None:
    reference = tensors_sha256(base_tensors())
    assert (tensors_sha256(change(base_tensors())) == reference) is same


def test_tensors_sha256_bfloat16() -> None:
    t = torch.linspace(-1, 1, 8).to(torch.bfloat16)
    assert tensors_sha256({"w": t}) == tensors_sha256({"w": t.clone()})
    assert tensors_sha256({"w": t}) != tensors_sha256({"w": t.to(torch.float16)})


def test_tensors_sha256_is_bitwise_not_numeric() -> None:
    zero, negative_zero = torch.zeros(3), -torch.zeros(3)
    assert torch.equal(zero, negative_zero)
    assert tensors_sha256({"w": zero}) != tensors_sha256({"w": negative_zero})


# --- another job's checkpoints and adapter under the same prefix -----------------------------


def test_plan_lists_the_checkpoints_of_other_fingerprints() -> None:
    plan = plan_resume([ckpt(20, CURRENT), ckpt(15, OTHER), ckpt(10, CURRENT)], CURRENT)
    assert plan.mode is ResumeMode.EXACT and [c.step for c in plan.candidates] == [20, 10]
    assert [c.step for c in plan.foreign] == [15]
    warm = plan_resume([ckpt(15, OTHER)], CURRENT, warm_start=True)
    assert [c.step for c in warm.foreign] == [15]
    assert plan_resume([ckpt(10, CURRENT)], CURRENT).foreign == ()


@pytest.mark.parametrize(
    ("foreign", "start", "max_steps", "refused"),
    [
        pytest.param([5, 10], 0, 4, [], id="warm-start-ends-before-them"),
        pytest.param([5, 10], 0, 12, [5, 10], id="warm-start-reaches-them"),
        pytest.param([5, 10], 0, 5, [5], id="the-last-step-counts"),
        pytest.param([5, 10], 10, 30, [], id="all-behind-the-start"),
        pytest.param([5, 30], 10, 20, [], id="beyond-the-end"),
        pytest.param([40], 10, -1, [40], id="by-epochs-every-later-step"),
    ],
)
def test_a_run_never_writes_over_another_jobs_checkpoint(
    foreign: list[int], start: int, max_steps: int, refused: list[int]
) -> None:
    plan = ResumePlan(ResumeMode.WARM, (), tuple(ckpt(s, OTHER) for s in foreign))
    if not refused:
        refuse_overwriting_foreign(plan, start_step=start, max_steps=max_steps)
        return
    with pytest.raises(ResumeRefused) as err:
        refuse_overwriting_foreign(plan, start_step=start, max_steps=max_steps)
    names = ", ".join(f"checkpoint-{s}" for s in refused)
    assert f"would overwrite {names} made by a different job" in str(err.value)
    assert f"resume.fromCheckpoint: {ckpt(refused[0], OTHER).uri} with resume.warmStart: true" in str(err.value)


def test_a_finished_adapter_of_another_job_is_refused_listing_every_difference() -> None:
    refuse_other_adapter(roundtrip(CURRENT), CURRENT, adapter_uri="s3://bkt/job/adapter/")
    with pytest.raises(ResumeRefused) as err:
        refuse_other_adapter(OTHER, fp(max_steps=50, seed=1), adapter_uri="s3://bkt/job/adapter/")
    message = str(err.value)
    assert message.startswith("s3://bkt/job/adapter/ already holds the finished adapter of a different job")
    assert "max_steps: 40 -> 50; seed: 3407 -> 1" in message and "new storage.uri" in message


# --- resume.extend: a finished run's checkpoint continued exactly by a longer job ------------

SHORT = fp(max_steps=10)  # the finished run; CURRENT (max_steps 30) extends it
BY_EPOCHS = fp(max_steps=-1, num_train_epochs=4.0)

EXTENSIONS = [
    # (complete newest first, explicit, current, candidate URIs in order)
    pytest.param([], ckpt(10, SHORT, job="old"), CURRENT, [ckpt(10, SHORT, job="old").uri], id="longer-max-steps"),
    pytest.param(
        [], ckpt(10, roundtrip(SHORT), job="old"), CURRENT, [ckpt(10, SHORT, job="old").uri], id="read-back-from-json"
    ),
    pytest.param([], ckpt(10, SHORT, job="old"), BY_EPOCHS, [ckpt(10, SHORT, job="old").uri], id="now-by-epochs"),
    pytest.param(
        [],
        ckpt(20, fp(max_steps=-1, num_train_epochs=1.0), job="old"),
        CURRENT,
        [ckpt(20, SHORT, job="old").uri],
        id="was-by-epochs",
    ),
    pytest.param(
        [], ckpt(10, CURRENT, job="old"), CURRENT, [ckpt(10, CURRENT, job="old").uri], id="same-length-mid-run"
    ),
    pytest.param(
        [ckpt(25, CURRENT), ckpt(15, CURRENT)],
        ckpt(10, SHORT, job="old"),
        CURRENT,
        [ckpt(25, CURRENT).uri, ckpt(15, CURRENT).uri, ckpt(10, SHORT, job="old").uri],
        id="relaunch-own-checkpoints-win",
    ),
    pytest.param(
        [ckpt(25, fp(seed=1)), ckpt(15, CURRENT)],
        ckpt(10, SHORT, job="old"),
        CURRENT,
        [ckpt(15, CURRENT).uri, ckpt(10, SHORT, job="old").uri],
        id="own-of-another-fingerprint-skipped",
    ),
]


@pytest.mark.parametrize(("complete", "explicit", "current", "uris"), EXTENSIONS)
def test_extend_resumes_the_shorter_runs_checkpoint_exactly(
    complete: list[Candidate], explicit: Candidate, current: dict[str, Any], uris: list[str]
) -> None:
    plan = plan_resume(complete, current, explicit=explicit, extend=True)
    assert plan.mode is ResumeMode.EXACT
    assert [c.uri for c in plan.candidates] == uris
    assert plan.extends == explicit
    # Without extend the same checkpoint is a changed job (unless its fingerprint is the job's).
    if explicit.fingerprint != current and not complete:
        with pytest.raises(ResumeRefused):
            plan_resume(complete, current, explicit=explicit)


EXTENSION_REFUSALS = [
    # (explicit's step, its fingerprint, the job's, epochs done (None: not read yet), message parts in order)
    pytest.param(
        10,
        SHORT,
        fp(max_steps=30, seed=1, lora={"r": 8}),
        None,
        [
            "cannot extend s3://bkt/old/checkpoints/checkpoint-10/ (resume.extend: true): only max_steps and "
            "num_train_epochs may differ",
            "max_steps: 10 -> 30",
            "; seed: 3407 -> 1",
            "; lora.r: 16 -> 8",
            "resume.warmStart: true instead of resume.extend",
        ],
        id="other-differences-all-listed",
    ),
    pytest.param(
        10,
        SHORT,
        fp(max_steps=30, dataset_sha256="b" * 64),
        None,
        ["dataset content: aaaaaaaaaaaa -> bbbbbbbbbbbb", "; max_steps: 10 -> 30"],
        id="new-data",
    ),
    pytest.param(
        10,
        SHORT,
        fp(max_steps=10),
        None,
        [
            "resume.extend: the job's max_steps 10 does not go past s3://bkt/old/checkpoints/checkpoint-10/, which "
            "has trained 10 steps",
            "set max_steps above 10",
        ],
        id="equal-length",
    ),
    pytest.param(
        10,
        SHORT,
        fp(max_steps=8),
        None,
        ["resume.extend: the job's max_steps 8 does not go past", "trained 10 steps", "set max_steps above 10"],
        id="shorter",
    ),
    pytest.param(
        30,
        fp(max_steps=-1, num_train_epochs=3.0),
        fp(max_steps=-1, num_train_epochs=3.0),
        3.0,
        [
            "resume.extend: the job's num_train_epochs 3 does not go past",
            "which has trained 3 epochs (30 steps)",
            "set num_train_epochs above 3",
        ],
        id="equal-epochs",
    ),
    pytest.param(
        20,
        SHORT,
        fp(max_steps=-1, num_train_epochs=1.5),
        2.0,
        ["num_train_epochs 1.5 does not go past", "trained 2 epochs (20 steps)"],
        id="fewer-epochs",
    ),
]


@pytest.mark.parametrize(("step", "saved", "current", "epochs_done", "parts"), EXTENSION_REFUSALS)
def test_extend_refusals_name_the_differences_or_the_numbers(
    step: int, saved: dict[str, Any], current: dict[str, Any], epochs_done: float | None, parts: list[str]
) -> None:
    explicit = ckpt(step, saved, job="old")
    with pytest.raises(ResumeRefused) as info:
        if epochs_done is None:
            plan_resume([], current, explicit=explicit, extend=True)
        else:
            plan_resume([], current, explicit=explicit, extend=True)  # the plan cannot know the epochs
            check_extension(explicit, current, epochs_done=epochs_done)
    message = str(info.value)
    position = 0
    for part in parts:
        position = message.index(part, position) + len(part)  # present, in this order
    assert info.value.permanent is True


@pytest.mark.parametrize(
    ("complete", "explicit"),
    [
        pytest.param([ckpt(30, CURRENT), ckpt(20, CURRENT)], ckpt(30, CURRENT), id="its-final-checkpoint"),
        pytest.param([ckpt(30, CURRENT), ckpt(20, CURRENT)], ckpt(20, CURRENT), id="an-older-one"),
    ],
)
def test_extend_naming_the_jobs_own_checkpoint_is_a_plain_resume(
    complete: list[Candidate], explicit: Candidate
) -> None:
    """The operator relaunches an extending job with its own newest checkpoint as fromCheckpoint:
    no extension rules then (its final checkpoint is at max_steps: the adapter is published)."""
    plan = plan_resume(complete, CURRENT, explicit=explicit, extend=True)
    assert plan.mode is ResumeMode.EXACT and plan.extends is None
    assert [c.step for c in plan.candidates] == [30, 20]


@pytest.mark.parametrize(
    ("state", "max_steps", "finished"),
    [
        pytest.param({"global_step": 30, "max_steps": 30}, 30, True, id="own-final"),
        pytest.param({"global_step": 20, "max_steps": 30}, 30, False, id="own-mid-run"),
        pytest.param({"global_step": 10, "max_steps": 10}, 30, False, id="extended-run-final-the-job-counts"),
        pytest.param({"global_step": 20, "max_steps": 20}, -1, True, id="by-epochs-its-own-total"),
        pytest.param({"global_step": 10, "max_steps": 20}, -1, False, id="by-epochs-mid-run"),
        pytest.param({"global_step": 0, "max_steps": 0}, -1, False, id="no-total"),
    ],
)
def test_training_finished_counts_the_jobs_length(
    tmp_path, state: dict[str, int], max_steps: int, finished: bool
) -> None:
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    assert training_finished(read_checkpoint_state(tmp_path), max_steps) is finished


def test_extend_by_epochs_goes_past_the_epochs_done() -> None:
    check_extension(ckpt(20, SHORT, job="old"), fp(max_steps=-1, num_train_epochs=2.5), epochs_done=2.0)


def test_a_relaunch_refuses_an_extension_the_job_no_longer_is() -> None:
    """The explicit checkpoint is checked on every attempt, also once the job has its own."""
    with pytest.raises(ResumeRefused, match="cannot extend"):
        plan_resume([ckpt(15, fp(seed=1))], fp(seed=1), explicit=ckpt(10, SHORT, job="old"), extend=True)


JOB = {"baseModel": "m", "dataset": {"source": "d.jsonl"}, "storage": {"uri": "s3://my-bucket/j/"}}
FROM = "s3://my-bucket/old/checkpoints/checkpoint-10/"


@pytest.mark.parametrize(
    ("resume", "parts"),
    [
        pytest.param(
            {"extend": True}, ["resume: `resume.extend: true` needs `resume.fromCheckpoint`"], id="no-checkpoint"
        ),
        pytest.param(
            {"extend": True, "warmStart": True, "fromCheckpoint": FROM},
            ["resume: `resume.extend` and `resume.warmStart` exclude each other"],
            id="with-warm-start",
        ),
    ],
)
def test_extend_config_errors_name_the_fields(resume: dict[str, Any], parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job({**JOB, "resume": resume})
    for part in parts:
        assert part in str(info.value)
    assert info.value.field == "resume"


def test_extend_defaults_off_and_parses_with_its_checkpoint() -> None:
    job = parse_job({**JOB, "resume": {"fromCheckpoint": FROM, "extend": True}})
    assert job.resume.extend is True and job.resume.from_checkpoint == FROM
    assert parse_job(JOB).resume.extend is False
