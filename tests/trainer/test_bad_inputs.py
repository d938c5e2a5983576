"""Bad input ends the attempt with the right exit class and a one-line reason, and no secret anywhere.

Exit classes (outcome.Outcome): 78 = permanent config error (the operator does not retry),
1 = retryable failure. Every process runs with a canary secret in its environment.
"""

from __future__ import annotations

import json

import pytest

from tests.support.tiny_model import build_tiny_llama, write_jsonl
from tests.support.trainer_runs import run_attempt

pytestmark = pytest.mark.slow

CANARY = "CANARYsecretKEY0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """A LoRA made for a different base (hidden size 32 instead of 64)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("foreign")
    base = build_tiny_llama(root / "base32", hidden=32)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(root / "adapter")
    return root / "adapter"


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", rows)


def check_one_line_and_no_secret(attempt):
    reason = attempt.termination["reason"]
    assert reason and "\n" not in reason
    everything = attempt.stderr + json.dumps(attempt.events) + json.dumps(attempt.termination)
    assert CANARY not in everything


CASES = {
    # name: (overrides(fixtures) -> dict, exit code, field, words the reason must contain)
    "missing-dataset-field": (
        lambda f: {"dataset": {"source": str(f["qa"])}},
        78,
        "dataset.template",
        ["instruction", "question", "answer"],
    ),
    "unknown-template": (
        lambda f: {"dataset": {"template": "shakespeare"}},
        78,
        "dataset.template",
        ["shakespeare", "alpaca"],
    ),
    "unknown-sftconfig-field": (
        lambda f: {"training": {"learning_rat": 0.1}},
        78,
        "training.learning_rat",
        ["learning_rate"],
    ),
    "adapter-for-another-base": (
        lambda f: {"adapter": str(f["adapter"])},
        78,
        "adapter",
        ["does not fit base model"],
    ),
    "missing-dataset-file": (
        lambda f: {"dataset": {"source": "/nonexistent/data.jsonl"}},
        78,
        "dataset.source",
        ["not found"],
    ),
    "missing-dataset-object": (
        lambda f: {"dataset": {"source": "s3://no-such-data-bucket/data.jsonl"}},
        78,
        None,
        ["no-such-data-bucket"],
    ),
    "unreachable-s3": (
        lambda f: {"storage": {"endpoint": "http://127.0.0.1:9"}},
        1,
        None,
        ["127.0.0.1"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exit_class_and_reason(name, make_job, foreign_adapter, qa_file, tiny_base):
    overrides, code, field, words = CASES[name]
    cfg, work = make_job(**overrides({"qa": qa_file, "adapter": foreign_adapter}))
    attempt = run_attempt(cfg, work, env={"AWS_SECRET_ACCESS_KEY": CANARY})
    assert attempt.exit_code == code, attempt.stderr[-3000:]
    assert attempt.termination["exit_code"] == code
    assert attempt.termination.get("field") == field
    for word in words:
        assert word in attempt.termination["reason"]
    if name == "adapter-for-another-base":
        assert str(tiny_base) in attempt.termination["reason"]
        assert str(foreign_adapter) in attempt.termination["reason"]
    check_one_line_and_no_secret(attempt)


def test_wrong_credentials_are_a_permanent_error_without_the_secret(make_job, s3_auth_server):
    cfg, work = make_job(storage={"uri": f"s3://{s3_auth_server.bucket}/job/", "endpoint": s3_auth_server.endpoint})
    attempt = run_attempt(
        cfg, work, env={"AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id, "AWS_SECRET_ACCESS_KEY": CANARY}
    )
    assert attempt.exit_code == 78
    assert "credentials" in attempt.termination["reason"]
    check_one_line_and_no_secret(attempt)


def test_right_credentials_work_against_the_auth_server(make_job, s3_auth_server):
    """The auth server really checks: the same job with the right secret gets past S3."""
    cfg, work = make_job(
        storage={"uri": f"s3://{s3_auth_server.bucket}/job/", "endpoint": s3_auth_server.endpoint},
        training={"max_steps": 2, "save_steps": 2},
    )
    attempt = run_attempt(
        cfg,
        work,
        env={
            "AWS_ACCESS_KEY_ID": s3_auth_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_auth_server.secret_access_key,
        },
    )
    assert attempt.exit_code == 0, attempt.stderr[-3000:]
    assert attempt.termination["outcome"] == "succeeded"
