"""`training` to SFTConfig (imports trl; CPU only) and the pure adapter checks in model_loading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loraresume_trainer.config import JobConfig, parse_job
from loraresume_trainer.errors import ConfigError
from loraresume_trainer.model_loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_misfits,
    job_lora_shape,
    lora_shape,
    read_adapter_config,
    stage_adapter,
)
from loraresume_trainer.training_args import (
    build_sft_config,
    check_training_fields,
    determinism_env,
    precision_defaults,
)

MAX_SEQ = 512  # not SFTConfig's own max_length default, so the value is visibly ours


def make_job(training: dict[str, Any] | None = None, **top: Any) -> JobConfig:
    return parse_job(
        {
            "baseModel": "tiny",
            "maxSeqLength": MAX_SEQ,
            "dataset": {"source": "train.jsonl"},
            "storage": {"uri": "s3://my-bucket/job/"},
            "training": training or {},
            **top,
        }
    )


def build(job: JobConfig, out: Path, *, tensorboard: bool = False) -> Any:
    return build_sft_config(job, out, on_gpu=False, bf16_supported=False, tensorboard=tensorboard)


# --- check_training_fields -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        pytest.param("learning_rat", "learning_rate", id="learning_rat"),
        pytest.param("warmup_step", "warmup_steps", id="warmup_step"),
        pytest.param("lr_schedule_type", "lr_scheduler_type", id="lr_schedule_type"),
        pytest.param("num_epochs", "num_train_epochs", id="num_epochs"),
        pytest.param("zzqqxx", None, id="no-close-match"),
    ],
)
def test_unknown_training_field(key: str, suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        check_training_fields({"max_steps": 5, key: 1})
    assert info.value.field == f"training.{key}"
    message = str(info.value)
    assert message.startswith(f"training.{key}: unknown SFTConfig field")
    if suggestion:
        assert message.endswith(f"; did you mean `{suggestion}`?")
    else:
        assert "did you mean" not in message


def test_known_training_fields_pass() -> None:
    check_training_fields({"learning_rate": 1e-3, "max_steps": 5, "max_length": 64, "neftune_noise_alpha": 5})


# --- precision_defaults --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_gpu", "bf16_supported", "expected"),
    [
        pytest.param(False, False, {"bf16": False, "fp16": False}, id="cpu"),
        pytest.param(False, True, {"bf16": False, "fp16": False}, id="cpu-bf16-flag-ignored"),
        pytest.param(True, True, {"bf16": True, "fp16": False}, id="gpu-with-bf16"),
        pytest.param(True, False, {"bf16": False, "fp16": True}, id="gpu-without-bf16"),
    ],
)
def test_precision_defaults(on_gpu: bool, bf16_supported: bool, expected: dict[str, bool]) -> None:
    assert precision_defaults(on_gpu, bf16_supported) == expected


# --- build_sft_config ----------------------------------------------------------------------


def test_build_sft_config_defaults(tmp_path: Path) -> None:
    config = build(make_job(), tmp_path / "out")

    expected = {
        "output_dir": str(tmp_path / "out"),
        "bf16": False,
        "fp16": False,
        "save_strategy": "steps",
        "save_steps": 10,
        "save_total_limit": None,
        "save_only_model": False,
        "ignore_data_skip": False,
        "include_num_input_tokens_seen": "non_padding",
        "max_length": MAX_SEQ,
        "dataset_text_field": "text",
        "disable_tqdm": True,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "warmup_steps": 5,
        "max_steps": 60,
        "learning_rate": 2e-4,
        "optim": "adamw_8bit",
        "weight_decay": 0.01,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "seed": 3407,
    }
    assert {key: getattr(config, key) for key in expected} == expected
    assert "tensorboard" not in (config.report_to or [])


@pytest.mark.parametrize(
    ("tensorboard", "report_to"),
    [pytest.param(False, [], id="none"), pytest.param(True, ["tensorboard"], id="tensorboard")],
)
def test_build_sft_config_report_to(tmp_path: Path, tensorboard: bool, report_to: list[str]) -> None:
    assert build(make_job(), tmp_path, tensorboard=tensorboard).report_to == report_to


@pytest.mark.parametrize(
    ("training", "attribute", "value"),
    [
        pytest.param({"learning_rate": 1e-3}, "learning_rate", 1e-3, id="learning_rate"),
        pytest.param({"max_steps": 7}, "max_steps", 7, id="max_steps"),
        pytest.param({"save_steps": 3}, "save_steps", 3, id="save_steps"),
        pytest.param({"lr_scheduler_type": "cosine"}, "lr_scheduler_type", "cosine", id="lr_scheduler_type"),
        pytest.param({"optim": "adamw_torch"}, "optim", "adamw_torch", id="optim"),
        pytest.param({"seed": 11}, "seed", 11, id="seed"),
        pytest.param({"max_length": MAX_SEQ}, "max_length", MAX_SEQ, id="max_length-equal-to-max_seq_length"),
    ],
)
def test_job_value_overrides_default(tmp_path: Path, training: dict[str, Any], attribute: str, value: Any) -> None:
    assert getattr(build(make_job(training), tmp_path), attribute) == value


@pytest.mark.parametrize(
    ("training", "field", "parts"),
    [
        pytest.param(
            {"max_length": 128},
            "training.max_length",
            [f"128 differs from max_seq_length {MAX_SEQ}", "set only that one"],
            id="max_length-differs",
        ),
        pytest.param(
            {"lr_scheduler_type": "nope"},
            "training",
            ["rejected by SFTConfig: ", "nope is not a valid SchedulerType"],
            id="bad-scheduler",
        ),
        pytest.param({"optim": "nope"}, "training", ["rejected by SFTConfig: ", "nope"], id="bad-optimizer"),
        pytest.param(
            {"learning_rat": 1e-3, "max_length": 128},
            "training.learning_rat",
            ["did you mean `learning_rate`?"],
            id="unknown-field-checked-first",
        ),
    ],
)
def test_build_sft_config_errors(tmp_path: Path, training: dict[str, Any], field: str, parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build(make_job(training), tmp_path)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}: ")
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_build_sft_config_does_not_change_the_job(tmp_path: Path) -> None:
    job = make_job({"learning_rate": 1e-3})
    build(job, tmp_path)
    assert job.training == {"learning_rate": 1e-3}


# --- adapter_misfits -----------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
BASE_LINEARS = {Q: (64, 64), V: (64, 16), "model.layers.0.mlp.down_proj": (128, 64)}


def peft_key(module: str, part: str) -> str:
    return f"base_model.model.{module}.{part}.weight"


FITTING = {
    peft_key(Q, "lora_A"): (8, 64),
    peft_key(Q, "lora_B"): (64, 8),
    peft_key(V, "lora_A"): (8, 64),
    peft_key(V, "lora_B"): (16, 8),
}

MISFITS = [
    # (adapter tensor shapes, expected problems)
    pytest.param(FITTING, [], id="fits"),
    pytest.param({f"{Q}.lora_A.weight": (8, 64), f"{Q}.lora_B.weight": (64, 8)}, [], id="fits-without-peft-prefix"),
    pytest.param(
        {**FITTING, peft_key("model.layers.0.self_attn.k_proj", "lora_A"): (8, 64)},
        ["module model.layers.0.self_attn.k_proj does not exist in the base model"],
        id="missing-module",
    ),
    pytest.param(
        {**FITTING, peft_key(V, "lora_A"): (8, 32)},
        [f"{V}.lora_A has shape [8, 32], the base needs 64 on axis 1"],
        id="wrong-in_features-on-lora_A",
    ),
    pytest.param(
        {**FITTING, peft_key(V, "lora_B"): (64, 8)},
        [f"{V}.lora_B has shape [64, 8], the base needs 16 on axis 0"],
        id="wrong-out_features-on-lora_B",
    ),
    pytest.param(
        {**FITTING, peft_key(Q, "lora_A"): (8,)},
        [f"{Q}.lora_A has shape [8], the base needs 64 on axis 1"],
        id="not-2d",
    ),
    pytest.param(
        {
            **FITTING,
            "base_model.model.lm_head.weight": (100, 64),
            f"base_model.model.{Q}.lora_magnitude_vector": (64,),
            "base_model.model.model.embed_tokens.lora_embedding_A": (8, 100),
        },
        [],
        id="non-lora-keys-ignored",
    ),
    pytest.param(
        {peft_key(V, "lora_B"): (1, 8), peft_key(Q, "lora_A"): (8, 1)},
        [
            f"{Q}.lora_A has shape [8, 1], the base needs 64 on axis 1",
            f"{V}.lora_B has shape [1, 8], the base needs 16 on axis 0",
        ],
        id="several-sorted-by-key",
    ),
]


@pytest.mark.parametrize(("shapes", "problems"), MISFITS)
def test_adapter_misfits(shapes: dict[str, tuple[int, ...]], problems: list[str]) -> None:
    assert adapter_misfits(shapes, BASE_LINEARS) == problems


# --- lora_shape / read_adapter_config ------------------------------------------------------


@pytest.mark.parametrize(
    ("adapter_config", "expected"),
    [
        pytest.param(
            {
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "target_modules": ["v_proj", "q_proj"],
                "bias": "lora_only",
                "use_rslora": True,
                "base_model_name_or_path": "/elsewhere",
            },
            {
                "r": 8,
                "alpha": 32,
                "dropout": 0.05,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "lora_only",
                "use_rslora": True,
            },
            id="full",
        ),
        pytest.param(
            {"r": 4, "lora_alpha": 4, "target_modules": "all-linear"},
            {"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": ["all-linear"], "bias": "none", "use_rslora": False},
            id="string-target_modules",
        ),
        pytest.param(
            {},
            {"r": 0, "alpha": 0, "dropout": 0.0, "target_modules": [], "bias": "none", "use_rslora": False},
            id="defaults",
        ),
        pytest.param(
            {"r": "16", "lora_alpha": 16.0, "target_modules": None},
            {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": [], "bias": "none", "use_rslora": False},
            id="coerced-types-null-targets",
        ),
    ],
)
def test_lora_shape(adapter_config: dict[str, Any], expected: dict[str, Any]) -> None:
    assert lora_shape(adapter_config) == expected


def test_lora_shape_matches_the_job_shape_for_the_same_lora() -> None:
    job = make_job(
        lora={"r": 8, "alpha": 32, "dropout": 0.05, "targetModules": ["v_proj", "q_proj"], "useRslora": True}
    )
    peft = {
        "r": 8,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": True,
    }
    assert lora_shape(peft) == job_lora_shape(job)


def test_read_adapter_config(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
    assert read_adapter_config(tmp_path, "s3://bkt/a/") == {"r": 8}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            None, f"adapter: s3://bkt/a/ is not a LoRA adapter: it has no {ADAPTER_CONFIG}", id="missing-file"
        ),
        pytest.param(b"{not json", f"adapter: s3://bkt/a/: {ADAPTER_CONFIG} is not valid JSON (", id="bad-json"),
        pytest.param(b"", f"adapter: s3://bkt/a/: {ADAPTER_CONFIG} is not valid JSON (", id="empty-file"),
    ],
)
def test_read_adapter_config_errors(tmp_path: Path, content: bytes | None, expected: str) -> None:
    if content is not None:
        (tmp_path / ADAPTER_CONFIG).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_adapter_config(tmp_path, "s3://bkt/a/")
    assert info.value.field == "adapter"
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize(
    "content",
    [pytest.param(b"\xff\xfe{\x00", id="not-utf8"), pytest.param(b"[1, 2]", id="json-array")],
)
def test_read_adapter_config_rejects_unusable_files(tmp_path: Path, content: bytes) -> None:
    (tmp_path / ADAPTER_CONFIG).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        read_adapter_config(tmp_path, "s3://bkt/a/")
    assert info.value.field == "adapter"


# --- stage_adapter -------------------------------------------------------------------------


def test_stage_adapter(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    original = {
        "base_model_name_or_path": "/other-pod/cache/base",
        "inference_mode": True,
        "r": 8,
        "target_modules": ["q_proj"],
    }
    (src / ADAPTER_CONFIG).write_text(json.dumps(original))
    weights = os.urandom(4096)
    (src / ADAPTER_WEIGHTS).write_bytes(weights)
    (src / "tokenizer.json").write_text('{"t": 1}')
    dest = tmp_path / "staged"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"old")

    assert stage_adapter(src, dest, "/work/cache/base") == dest

    staged = json.loads((dest / ADAPTER_CONFIG).read_text())
    assert staged == {**original, "base_model_name_or_path": "/work/cache/base", "inference_mode": False}
    assert (dest / ADAPTER_WEIGHTS).read_bytes() == weights
    assert (dest / "tokenizer.json").read_text() == '{"t": 1}'
    assert not (dest / "stale.bin").exists()
    assert json.loads((src / ADAPTER_CONFIG).read_text()) == original  # the source is untouched


@pytest.mark.parametrize(
    ("training", "environ", "expected"),
    [
        ({}, {}, {}),
        ({"full_determinism": False}, {}, {}),
        ({"full_determinism": "yes"}, {}, {}),  # SFTConfig's own check judges the value; nothing set here
        ({"full_determinism": True}, {}, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}),
        ({"full_determinism": True}, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, {}),  # the pod's own value wins
    ],
)
def test_determinism_env(training: dict[str, Any], environ: dict[str, str], expected: dict[str, str]) -> None:
    assert determinism_env(training, environ) == expected


class _StopAtImports:
    """An engine that records the environment its imports would see, then stops the attempt."""

    fetches_inputs = False
    compiles = False

    def __init__(self) -> None:
        self.event_fields: dict[str, Any] = {}
        self.seen: str | None = None

    def load_stack(self, run: Any) -> None:
        self.seen = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        raise ConfigError("stopped by the test after the imports' environment was seen", field="training")


@pytest.mark.parametrize(("training", "seen"), [({"full_determinism": True}, ":4096:8"), ({}, None)])
def test_full_determinism_sets_cublas_before_the_imports(
    make_job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, training: dict[str, Any], seen: str | None
) -> None:
    import yaml

    from loraresume_trainer import cli

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset-by-the-test")  # restored (absent) at teardown
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    config, work = make_job(training={"max_steps": 2, **training})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    engine = _StopAtImports()
    code = cli.main(["--config", str(path), "--termination-log", str(tmp_path / "term")], engine=engine)
    assert code == 78 and engine.seen == seen
