"""The gradient-checkpointing decision (pure): estimates, `auto`, keeping a checkpoint's mode."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from loraresume_trainer.config import parse_job
from loraresume_trainer.errors import ConfigError, ResumeRefused
from loraresume_trainer.fingerprint import fingerprint_diff, make_fingerprint, same_run
from loraresume_trainer.grad_checkpointing import (
    MODES_FASTEST_FIRST,
    GiB,
    ModelShape,
    Workload,
    choose,
    estimate,
    fits,
    kept_mode,
    recorded_mode,
    sft_gradient_checkpointing,
    to_unsloth,
)
from loraresume_trainer.resume_plan import Candidate, ResumeMode, plan_resume

# Llama-3-8B and Llama-3.2-1B as their config.json has them (the shapes benchmarks/gpu_bench.py builds).
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
LLAMA_1B = {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64}
LLAMA_1B["tie_word_embeddings"] = True
S8B = ModelShape.from_config(LLAMA_8B)
S1B = ModelShape.from_config(LLAMA_1B)
SEED = Workload(tokens=2 * 2048)  # the seed's batch 2 x 2048-token rows, 4-bit, bf16, r=16 on 7 projections
GB = 10**9


def peak_gib(shape: ModelShape, work: Workload, mode: str) -> float:
    return estimate(shape, work, mode).peak / GiB  # type: ignore[arg-type]


# --- shapes -----------------------------------------------------------------------------------


def test_shape_from_llama_config() -> None:
    assert ModelShape(4096, 14336, 32, 32, 8, 128256, 128, False) == S8B
    assert S8B.linear_params == 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    assert S8B.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) == (
        41_943_040
    )
    assert S1B.head_dim == 64 and S1B.embedding_params == 128256 * 2048  # tied: one matrix


def test_shape_from_a_multimodal_config_uses_its_text_config() -> None:
    assert ModelShape.from_config({"model_type": "x", "text_config": LLAMA_8B}) == S8B


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="empty"),
        pytest.param({k: v for k, v in LLAMA_8B.items() if k != "vocab_size"}, id="no-vocab"),
        pytest.param({**LLAMA_8B, "num_attention_heads": 0}, id="zero-heads"),
        pytest.param({**LLAMA_8B, "hidden_size": "wide"}, id="not-a-number"),
    ],
)
def test_unknown_configs_are_value_errors(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="not a decoder config"):
        ModelShape.from_config(config)


# --- estimates against what was measured (8B, H200, issue 16's table) -------------------------


@pytest.mark.parametrize(
    ("mode", "measured_gib"),
    [("false", 20.9), ("true", 7.6), ("unsloth", 6.7)],
)
def test_estimates_match_the_measured_8b_peaks_within_ten_percent(mode: str, measured_gib: float) -> None:
    assert peak_gib(S8B, SEED, mode) == pytest.approx(measured_gib, rel=0.10)


def test_less_recompute_costs_more_memory_and_activations_scale_with_tokens() -> None:
    for shape in (S8B, S1B):
        peaks = [peak_gib(shape, SEED, m) for m in MODES_FASTEST_FIRST]
        assert peaks == sorted(peaks, reverse=True)
        double = Workload(tokens=2 * SEED.tokens)
        a, b = estimate(shape, SEED, "false"), estimate(shape, double, "false")
        assert b.saved_activations == pytest.approx(2 * a.saved_activations, rel=1e-6)
        assert b.weights == a.weights and b.lora_state == a.lora_state


def test_unquantized_weights_take_the_dtype_bytes_and_fp32_doubles_them() -> None:
    bf16 = estimate(S1B, Workload(tokens=1024, load_in_4bit=False), "true").weights
    fp32 = estimate(S1B, Workload(tokens=1024, load_in_4bit=False, dtype="float32"), "true").weights
    q4 = estimate(S1B, Workload(tokens=1024), "true").weights
    assert fp32 == 2 * bf16 and q4 < bf16 / 2


def test_torch_adamw_state_is_larger_than_8bit() -> None:
    assert (
        estimate(S8B, Workload(tokens=1, optim="adamw_torch"), "true").lora_state
        > estimate(S8B, Workload(tokens=1, optim="adamw_8bit"), "true").lora_state
    )


# --- auto: the fastest mode that fits ---------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "tokens", "gpu_bytes", "mode"),
    [
        pytest.param(S8B, 4096, 141 * GB, "false", id="8b-seed-h200"),
        pytest.param(S8B, 4096, 80 * GB, "false", id="8b-seed-80gb"),
        pytest.param(S8B, 4096, 40 * GB, "false", id="8b-seed-40gb"),
        pytest.param(S8B, 4096, 24 * GB, "true", id="8b-seed-24gb"),
        pytest.param(S8B, 4096, 12 * GB, "true", id="8b-seed-12gb"),
        pytest.param(S8B, 4096, 11 * GB, "unsloth", id="8b-seed-11gb"),
        pytest.param(S8B, 16 * 2048, 141 * GB, "true", id="8b-16x2048-h200"),
        pytest.param(S8B, 8 * 8192, 24 * GB, "unsloth", id="8b-long-24gb"),
        pytest.param(S8B, 4096, 6 * GB, "unsloth", id="8b-nothing-fits"),
        pytest.param(S1B, 4 * 2048, 16 * GB, "false", id="1b-4x2048-16gb"),
        pytest.param(S1B, 8 * 2048, 24 * GB, "true", id="1b-8x2048-24gb"),
    ],
)
def test_auto_takes_the_fastest_mode_that_fits(shape: ModelShape, tokens: int, gpu_bytes: int, mode: str) -> None:
    decision = choose("auto", shape, Workload(tokens=tokens), gpu_bytes)
    assert decision.mode == mode
    assert set(decision.estimates) == set(MODES_FASTEST_FIRST)
    faster = MODES_FASTEST_FIRST[: MODES_FASTEST_FIRST.index(decision.mode)]
    assert not any(fits(decision.estimates[m].peak, gpu_bytes) for m in faster)


def test_nothing_fitting_says_so_and_takes_the_lowest_memory_mode() -> None:
    decision = choose("auto", S8B, SEED, 6 * GB)
    assert decision.mode == "unsloth" and "nothing fits" in decision.reason


def test_headroom_is_required() -> None:
    peak = estimate(S8B, SEED, "false").peak
    assert not fits(peak, peak) and not fits(peak, int(peak * 1.1))
    assert fits(peak, int(peak * 1.1) + 2 * GiB + 1)


@pytest.mark.parametrize("requested", ["false", "true", "unsloth"])
def test_an_explicit_mode_is_taken_as_is(requested: str) -> None:
    decision = choose(requested, S8B, SEED, 6 * GB, kept="true")
    assert decision.mode == requested and decision.requested == requested
    assert "set in the job" in decision.reason


def test_an_explicit_mode_that_will_not_fit_is_still_taken_with_a_warning() -> None:
    assert "may not fit" in choose("false", S8B, SEED, 24 * GB).reason


def test_auto_keeps_the_mode_of_the_checkpoint_it_resumes_even_where_another_would_be_chosen() -> None:
    decision = choose("auto", S8B, SEED, 141 * GB, kept="unsloth")
    assert decision.mode == "unsloth" and "kept from the checkpoint" in decision.reason
    assert "may not fit" in choose("auto", S8B, SEED, 24 * GB, kept="false").reason


def test_no_gpu_means_no_recompute_and_an_unknown_shape_the_lowest_memory_mode() -> None:
    assert choose("auto", S8B, SEED, None).mode == "false"
    unknown = choose("auto", None, SEED, 141 * GB)
    assert unknown.mode == "unsloth" and unknown.estimates == {}


@pytest.mark.parametrize("bad", ["on", "True", "", "offload"])
def test_unknown_requests_are_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        choose(bad, S8B, SEED, 141 * GB)
    with pytest.raises(ValueError, match="unknown gradient checkpointing mode"):
        estimate(S8B, SEED, bad)  # type: ignore[arg-type]


def test_summary_is_json_and_names_every_estimate() -> None:
    summary = json.loads(json.dumps(choose("auto", S8B, SEED, 141 * GB).summary()))
    assert summary["mode"] == "false" and summary["requested"] == "auto"
    assert set(summary["estimated_peak_gib"]) == {"false", "true", "unsloth"}
    assert summary["gpu_total_gib"] == pytest.approx(131.32, abs=0.01)


@pytest.mark.parametrize(
    ("mode", "unsloth", "sft"),
    [("false", False, False), ("true", True, True), ("unsloth", "unsloth", True)],
)
def test_wiring_to_unsloth_and_sftconfig(mode: str, unsloth: object, sft: bool) -> None:
    assert to_unsloth(mode) == unsloth  # type: ignore[arg-type]
    assert sft_gradient_checkpointing(mode) is sft  # type: ignore[arg-type]


# --- the mode in fingerprints and resumes -----------------------------------------------------

BASE_FP: dict[str, Any] = dict(
    base_model="m",
    dataset_sha256="a" * 64,
    template="alpaca",
    max_seq_length=2048,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_steps=60,
    num_train_epochs=3.0,
    seed=3407,
    lora={"r": 16, "target_modules": ["q_proj"]},
    training={"learning_rate": 2e-4},
)


def fp(mode: str | None, **overrides: Any) -> dict[str, Any]:
    return json.loads(json.dumps(make_fingerprint(**{**BASE_FP, **overrides}, gradient_checkpointing=mode)))


def ckpt(step: int, fingerprint: dict[str, Any]) -> Candidate:
    return Candidate(step, f"s3://b/j/checkpoints/checkpoint-{step}/", fingerprint)


def test_fingerprint_records_the_mode_only_when_given() -> None:
    assert fp("false")["gradient_checkpointing"] == "false"
    assert "gradient_checkpointing" not in fp(None)


@pytest.mark.parametrize(
    ("saved", "current", "same"),
    [
        pytest.param("false", "false", True, id="same-mode"),
        pytest.param("false", "true", False, id="other-mode"),
        pytest.param(None, "unsloth", True, id="legacy-checkpoint-was-unsloth"),
        pytest.param(None, "false", False, id="legacy-checkpoint-is-not-false"),
        pytest.param(None, None, True, id="neither-records-it"),
    ],
)
def test_same_run_reads_a_missing_mode_as_unsloths(saved: str | None, current: str | None, same: bool) -> None:
    assert same_run(fp(saved), fp(current)) is same
    assert recorded_mode(fp(saved)) == (saved or "unsloth")


def test_kept_mode_takes_the_first_fingerprint_equal_on_everything_else() -> None:
    current = fp(None)
    other_job = fp("true", max_steps=99)
    assert kept_mode([], current) is None
    assert kept_mode([other_job], current) is None
    assert kept_mode([other_job, fp("false"), fp("true")], current) == "false"
    assert kept_mode([fp(None)], current) == "unsloth"  # saved before the mode was recorded
    assert kept_mode([fp("true")], fp("false")) == "true"  # `current`'s own mode is ignored


def test_plan_resume_refuses_a_changed_mode_naming_it() -> None:
    with pytest.raises(ResumeRefused) as err:
        plan_resume([ckpt(10, fp("false"))], fp("true"))
    assert "gradient_checkpointing: 'false' -> 'true'" in str(err.value)
    warm = plan_resume([ckpt(10, fp("false"))], fp("true"), warm_start=True)
    assert warm.mode is ResumeMode.WARM


def test_plan_resume_resumes_a_legacy_checkpoint_under_unsloth_exactly() -> None:
    plan = plan_resume([ckpt(10, fp(None))], fp("unsloth"))
    assert plan.mode is ResumeMode.EXACT and plan.candidates[0].step == 10
    assert fingerprint_diff(fp(None), fp("unsloth")) == []
    assert fingerprint_diff(fp(None), fp("false")) == ["gradient_checkpointing: 'unsloth' -> 'false'"]


# --- the job field ----------------------------------------------------------------------------

JOB = {"baseModel": "m", "dataset": {"source": "d.jsonl"}, "storage": {"uri": "s3://bucket/job/"}}


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        pytest.param(None, "auto", id="default-auto"),
        pytest.param("unsloth", "unsloth", id="unsloth"),
        pytest.param("false", "false", id="string-false"),
        pytest.param(False, "false", id="yaml-boolean-false"),
        pytest.param(True, "true", id="yaml-boolean-true"),
    ],
)
def test_job_field(value: object, parsed: str) -> None:
    data = dict(JOB) if value is None else {**JOB, "gradientCheckpointing": value}
    assert parse_job(data).gradient_checkpointing == parsed


def test_job_field_rejects_other_values_and_the_sftconfig_spelling() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        parse_job({**JOB, "gradient_checkpointing": "offload"})
    with pytest.raises(ConfigError, match="use the job's `gradient_checkpointing`"):
        parse_job({**JOB, "training": {"gradient_checkpointing": False}})


def test_the_decision_module_imports_no_heavy_library() -> None:
    code = (
        "import sys, loraresume_trainer.grad_checkpointing, loraresume_trainer.fingerprint;"
        "print([m for m in ('torch', 'transformers', 'unsloth', 'trl') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
