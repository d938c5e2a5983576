"""What the resume fingerprint covers: every input that changes the trajectory, nothing that does not.

From the operator's resource to the trainer's fingerprint: the spec's `training` section becomes
the job's SFTConfig values (TrainingSpec.sft_config), the trainer overlays its defaults
(effective_training), and make_fingerprint keeps what changes which rows produce which weights.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from loraresume_operator.spec import TrainingSpec
from loraresume_trainer.config import JobConfig
from loraresume_trainer.fingerprint import (
    fingerprint_diff,
    job_fingerprint,
    normalised_value,
    same_run,
    unchecked_keys,
)
from loraresume_trainer.grad_checkpointing import kept_mode

LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "use_rslora": False}


def fingerprint(
    training: dict[str, Any] | None = None,
    *,
    lora: dict[str, Any] | None = None,
    template: str = "alpaca",
    dataset_sha256: str = "a" * 64,
) -> dict[str, Any]:
    """The trainer's fingerprint of a resource whose spec.training is `training`, as read back from S3."""
    spec = TrainingSpec.model_validate(training or {})
    job = JobConfig.model_validate(
        {
            "baseModel": "m",
            "dataset": {"source": "s3://bkt/d.jsonl", "template": template},
            "storage": {"uri": "s3://bkt/j/"},
            "training": spec.sft_config(),
        }
    )
    made = job_fingerprint(job, dataset_sha256=dataset_sha256, lora={**LORA, **(lora or {})})
    return json.loads(json.dumps({**made, "gradient_checkpointing": "unsloth"}))


BASE = fingerprint()

# Each input the issue names as changing the trajectory, changed once, with the line the refusal shows.
TRAJECTORY_CHANGES = [
    pytest.param({"training": {"learningRate": 3e-4}}, "training.learning_rate: 0.0002 -> 0.0003", id="learning-rate"),
    pytest.param(
        {"training": {"lrSchedulerType": "cosine"}}, "training.lr_scheduler_type: 'linear' -> 'cosine'", id="scheduler"
    ),
    pytest.param(
        {"training": {"extra": {"lr_scheduler_kwargs": {"num_cycles": 2}}}},
        "training.lr_scheduler_kwargs: (not set) -> {'num_cycles': 2}",
        id="scheduler-arguments",
    ),
    pytest.param({"training": {"warmupSteps": 10}}, "training.warmup_steps: 5 -> 10", id="warmup-steps"),
    pytest.param(
        {"training": {"extra": {"warmup_ratio": 0.1}}}, "training.warmup_ratio: (not set) -> 0.1", id="warmup-ratio"
    ),
    pytest.param(
        {"training": {"optim": "adamw_torch"}}, "training.optim: 'adamw_8bit' -> 'adamw_torch'", id="optimizer"
    ),
    pytest.param(
        {"training": {"extra": {"adam_beta2": 0.95}}},
        "training.adam_beta2: (not set) -> 0.95",
        id="optimizer-arguments",
    ),
    pytest.param(
        {"training": {"extra": {"optim_args": "betas=(0.9,0.95)"}}}, "training.optim_args: (not set)", id="optim-args"
    ),
    pytest.param({"training": {"weightDecay": 0.0}}, "training.weight_decay: 0.01 -> 0", id="weight-decay"),
    pytest.param(
        {"training": {"extra": {"max_grad_norm": 0.3}}}, "training.max_grad_norm: (not set) -> 0.3", id="max-grad-norm"
    ),
    pytest.param({"training": {"extra": {"packing": True}}}, "training.packing: (not set) -> True", id="packing"),
    pytest.param(
        {"training": {"extra": {"padding_free": True}}}, "training.padding_free: False -> True", id="padding-free"
    ),
    pytest.param(
        {"training": {"extra": {"neftune_noise_alpha": 5}}},
        "training.neftune_noise_alpha: (not set) -> 5",
        id="any-extra-key",
    ),
    pytest.param({"training": {"seed": 1}}, "seed: 3407 -> 1", id="seed"),
    pytest.param({"training": {"maxSteps": 61}}, "max_steps: 60 -> 61", id="max-steps"),
    pytest.param({"training": {"perDeviceTrainBatchSize": 4}}, "per_device_train_batch_size: 2 -> 4", id="batch"),
    pytest.param({"lora": {"dropout": 0.05}}, "lora.dropout: 0.0 -> 0.05", id="lora-dropout"),
    pytest.param({"template": "chat"}, "template: 'alpaca' -> 'chat'", id="template"),
    pytest.param({"dataset_sha256": "b" * 64}, "dataset content: aaaaaaaaaaaa -> bbbbbbbbbbbb", id="dataset-content"),
]


@pytest.mark.parametrize(("change", "line"), TRAJECTORY_CHANGES)
def test_every_trajectory_input_refuses_an_exact_resume_naming_it(change: dict[str, Any], line: str) -> None:
    changed = fingerprint(**change)
    assert not same_run(BASE, changed)
    diff = fingerprint_diff(BASE, changed)
    assert len(diff) == 1 and diff[0].startswith(line), diff


@pytest.mark.parametrize(
    "training",
    [
        pytest.param({"loggingSteps": 7}, id="logging-steps"),
        pytest.param({"saveSteps": 3}, id="save-steps"),
        pytest.param({"extra": {"logging_first_step": True, "disable_tqdm": True}}, id="logging-extras"),
        pytest.param({"extra": {"dataloader_pin_memory": False, "run_name": "x"}}, id="host-side"),
    ],
)
def test_cadence_and_reporting_may_change(training: dict[str, Any]) -> None:
    changed = fingerprint(training)
    assert same_run(BASE, changed) and fingerprint_diff(BASE, changed) == []


def test_a_refusal_lists_every_difference() -> None:
    changed = fingerprint({"learningRate": 1e-4, "seed": 9, "extra": {"max_grad_norm": 0.5}}, lora={"dropout": 0.1})
    assert fingerprint_diff(BASE, changed) == [
        "seed: 3407 -> 9",
        "lora.dropout: 0.0 -> 0.1",
        "training.learning_rate: 0.0002 -> 0.0001",
        "training.max_grad_norm: (not set) -> 0.5",
    ]


def test_equal_values_spelt_differently_are_the_same_run() -> None:
    """1 and 1.0 are one number (the API server stores an integral JSON float as an int)."""
    assert same_run(fingerprint({"extra": {"max_grad_norm": 1}}), fingerprint({"extra": {"max_grad_norm": 1.0}}))
    assert normalised_value({"a": (1.0, float("nan")), "b": 2.5}) == {"a": [1, "nan"], "b": 2.5}


def test_a_fingerprint_saved_before_training_was_recorded_resumes_with_the_keys_unchecked() -> None:
    legacy = {k: v for k, v in BASE.items() if k != "training"}
    changed = fingerprint({"learningRate": 3e-4})
    assert same_run(legacy, changed)  # what it never recorded cannot be compared
    assert unchecked_keys(legacy, changed) == ["training"] and unchecked_keys(BASE, changed) == []
    assert not same_run(legacy, fingerprint({"seed": 1}))  # what it did record still is
    assert kept_mode([legacy], {k: v for k, v in changed.items() if k != "gradient_checkpointing"}) == "unsloth"
