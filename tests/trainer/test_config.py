"""The job config: defaults, snake/camel aliases, field-level errors, and where it is read from."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraresume_trainer.config import (
    DEFAULT_TARGET_MODULES,
    ENV_ATTEMPT,
    ENV_JOB,
    DatasetSettings,
    JobConfig,
    load_job,
    parse_job,
)
from loraresume_trainer.errors import ConfigError

MINIMAL: dict[str, Any] = {
    "baseModel": "unsloth/tiny-model",
    "dataset": {"source": "train.jsonl"},
    "storage": {"uri": "s3://my-bucket/jobs/one"},
}


def job_doc(**top: Any) -> dict[str, Any]:
    """MINIMAL with top-level fields replaced; a value of `...` deletes the field."""
    doc = copy.deepcopy(MINIMAL)
    for key, value in top.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def config_error(data: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job(data, **kwargs)
    return str(info.value)


# --- valid jobs ----------------------------------------------------------------------------


def test_minimal_job_gets_defaults() -> None:
    job = parse_job(job_doc())

    assert job.name == "job"
    assert job.base_model == "unsloth/tiny-model"
    assert job.max_seq_length == 2048
    assert job.load_in_4bit is True
    assert job.dtype == "auto"
    assert job.adapter is None
    assert job.lora.r == 16 and job.lora.alpha == 16 and job.lora.dropout == 0.0
    assert job.lora.target_modules == DEFAULT_TARGET_MODULES
    assert job.lora.bias == "none" and job.lora.use_rslora is False
    assert job.dataset.source == "train.jsonl" and job.dataset.name is None
    assert job.dataset.split == "train" and job.dataset.format is None
    assert job.dataset.template == "alpaca" and job.dataset.messages_column == "messages"
    assert job.training == {}
    assert job.storage.uri == "s3://my-bucket/jobs/one/"  # normalised to a directory prefix
    assert job.storage.endpoint is None and job.storage.region is None
    assert job.storage.keep_checkpoints == 3
    assert job.resume.from_checkpoint is None and job.resume.warm_start is False
    assert job.tensorboard is False
    assert job.attempt == 1
    assert job.work_dir == Path("/tmp/loraresume")
    assert job.termination_log == Path("/dev/termination-log")
    assert job.seed == 3407


CASE_ALIASES = [
    # (path in the document, value written, attribute read back, expected value)
    ("load_in_4bit", False, lambda j: j.load_in_4bit, False),
    ("loadIn4bit", False, lambda j: j.load_in_4bit, False),
    ("max_seq_length", 512, lambda j: j.max_seq_length, 512),
    ("maxSeqLength", 512, lambda j: j.max_seq_length, 512),
    ("work_dir", "/scratch", lambda j: j.work_dir, Path("/scratch")),
    ("workDir", "/scratch", lambda j: j.work_dir, Path("/scratch")),
    ("lora.target_modules", ["v_proj", "q_proj"], lambda j: j.lora.target_modules, ("v_proj", "q_proj")),
    ("lora.targetModules", ["v_proj", "q_proj"], lambda j: j.lora.target_modules, ("v_proj", "q_proj")),
    ("lora.use_rslora", True, lambda j: j.lora.use_rslora, True),
    ("lora.useRslora", True, lambda j: j.lora.use_rslora, True),
    ("storage.keep_checkpoints", 7, lambda j: j.storage.keep_checkpoints, 7),
    ("storage.keepCheckpoints", 7, lambda j: j.storage.keep_checkpoints, 7),
    ("dataset.messages_column", "conv", lambda j: j.dataset.messages_column, "conv"),
    ("dataset.messagesColumn", "conv", lambda j: j.dataset.messages_column, "conv"),
    ("resume.warm_start", True, lambda j: j.resume.warm_start, True),
    ("resume.warmStart", True, lambda j: j.resume.warm_start, True),
]


@pytest.mark.parametrize(("path", "value", "read", "expected"), CASE_ALIASES, ids=[c[0] for c in CASE_ALIASES])
def test_snake_and_camel_case_are_both_accepted(path: str, value: Any, read: Any, expected: Any) -> None:
    doc = job_doc()
    *parents, leaf = path.split(".")
    target = doc
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    assert read(parse_job(doc)) == expected


def test_base_model_snake_case_is_accepted() -> None:
    doc = job_doc(baseModel=..., base_model="some/model")
    assert parse_job(doc).base_model == "some/model"


@pytest.mark.parametrize(
    ("top", "check"),
    [
        pytest.param(
            {"storage": {"uri": "s3://my-bucket"}}, lambda j: j.storage.uri == "s3://my-bucket/", id="bucket-only-uri"
        ),
        pytest.param(
            {"storage": {"uri": "s3://my-bucket/p/", "endpoint": "", "region": ""}},
            lambda j: j.storage.endpoint is None and j.storage.region is None,
            id="empty-endpoint-and-region-are-none",
        ),
        pytest.param(
            {"adapter": "s3://my-bucket/adapters/a"},
            lambda j: j.adapter == "s3://my-bucket/adapters/a/",
            id="s3-adapter-as-dir",
        ),
        pytest.param({"adapter": "/models/adapter"}, lambda j: j.adapter == "/models/adapter", id="local-adapter-kept"),
        pytest.param({"adapter": ""}, lambda j: j.adapter is None, id="empty-adapter-is-none"),
        pytest.param(
            {"resume": {"fromCheckpoint": "s3://my-bucket/j/checkpoints/checkpoint-10"}},
            lambda j: j.resume.from_checkpoint == "s3://my-bucket/j/checkpoints/checkpoint-10/",
            id="from-checkpoint-as-dir",
        ),
        pytest.param(
            {"dataset": {"name": "tatsu-lab/alpaca"}},
            lambda j: j.dataset.name == "tatsu-lab/alpaca" and j.dataset.source is None,
            id="dataset-by-name",
        ),
        pytest.param(
            {"dataset": {"source": "x.csv", "template": "chat"}},
            lambda j: j.dataset.template == "chat",
            id="chat-template",
        ),
        pytest.param(
            {"dataset": {"source": "x.csv", "template": "Q: {question}\nA: {answer}"}},
            lambda j: j.dataset.custom_fields == ("question", "answer"),
            id="custom-template",
        ),
        pytest.param(
            {"training": {"seed": 7, "max_steps": 5}},
            lambda j: j.seed == 7 and j.training["max_steps"] == 5,
            id="training-passthrough-and-seed",
        ),
        pytest.param({"attempt": "4"}, lambda j: j.attempt == 4, id="attempt-from-string"),
    ],
)
def test_valid_variants(top: dict[str, Any], check: Any) -> None:
    assert check(parse_job(job_doc(**top)))


# --- invalid jobs --------------------------------------------------------------------------

INVALID = [
    # (top-level replacements, substrings the message must contain)
    pytest.param({"storage": {}}, ["storage.uri: Field required"], id="storage.uri-missing"),
    pytest.param({"storage": ...}, ["storage: Field required"], id="storage-missing"),
    pytest.param(
        {"storage": {"uri": "https://my-bucket/p"}}, ["storage.uri:", "is not an S3 URI"], id="storage.uri-not-s3"
    ),
    pytest.param(
        {"storage": {"uri": "s3://Bad_Bucket/p"}},
        ["storage.uri:", "invalid bucket name 'Bad_Bucket'"],
        id="storage.uri-bad-bucket",
    ),
    pytest.param(
        {"storage": {"uri": "s3://my-bucket/a//b"}},
        ["storage.uri:", "empty path segment"],
        id="storage.uri-empty-segment",
    ),
    pytest.param(
        {"storage": {"uri": "s3://my-bucket/", "keepCheckpoints": 0}},
        ["storage.keepCheckpoints:", "greater than or equal to 1"],
        id="storage.keepCheckpoints-zero",
    ),
    pytest.param({"storage": "s3://my-bucket/p"}, ["storage:", "valid dictionary"], id="storage-not-mapping"),
    pytest.param({"baseModel": ...}, ["baseModel: Field required"], id="baseModel-missing"),
    pytest.param({"baseModel": ""}, ["baseModel:", "at least 1 character"], id="baseModel-empty"),
    pytest.param({"dataset": ...}, ["dataset: Field required"], id="dataset-missing"),
    pytest.param(
        {"dataset": {"source": "a.jsonl", "name": "b"}},
        ["dataset: set exactly one of `source`", "`name`"],
        id="dataset-both-source-and-name",
    ),
    pytest.param({"dataset": {}}, ["dataset: set exactly one of `source`"], id="dataset-neither-source-nor-name"),
    pytest.param({"dataset": {"source": "a", "format": "xlsx"}}, ["dataset.format:"], id="dataset.format-unknown"),
    pytest.param(
        {"dataset": {"source": "a", "template": "alpca"}},
        ["dataset.template: unknown template 'alpca'", "alpaca, chat"],
        id="template-unknown-name",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "Q: {}"}},
        ["dataset.template: format-string fields must be plain column names"],
        id="template-positional",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "Q: {0}"}},
        ["dataset.template: format-string fields must be plain column names"],
        id="template-numbered",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "Q: {a.b}"}},
        ["dataset.template: format-string fields must be plain column names"],
        id="template-attribute",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "Q: {a[0]}"}},
        ["dataset.template: format-string fields must be plain column names"],
        id="template-index",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "Q: {question"}},
        ["dataset.template: not a valid format string"],
        id="template-unbalanced-brace",
    ),
    pytest.param(
        {"dataset": {"source": "a", "template": "{{literal}}"}},
        ["dataset.template: unknown template"],
        id="template-only-escaped-braces",
    ),
    pytest.param({"lora": {"r": 0}}, ["lora.r:", "greater than or equal to 1"], id="lora.r-zero"),
    pytest.param({"lora": {"r": 2048}}, ["lora.r:", "less than or equal to 1024"], id="lora.r-too-big"),
    pytest.param({"lora": {"dropout": 1.0}}, ["lora.dropout:"], id="lora.dropout-one"),
    pytest.param({"lora": {"bias": "some"}}, ["lora.bias:"], id="lora.bias-unknown"),
    pytest.param(
        {"lora": {"targetModules": []}}, ["lora.targetModules:", "at least 1 item"], id="lora.targetModules-empty"
    ),
    pytest.param({"lora": {"rank": 8}}, ["lora.rank: unknown field"], id="lora-unknown-field"),
    pytest.param(
        {"training": {"output_dir": "/out"}},
        ["training: `output_dir` cannot be set here"],
        id="training.output_dir-reserved",
    ),
    pytest.param(
        {"training": {"save_total_limit": 2}},
        ["training: `save_total_limit` cannot be set here", "storage.keepCheckpoints"],
        id="training.save_total_limit-reserved",
    ),
    pytest.param(
        {"training": {"resume_from_checkpoint": "x"}},
        ["training: `resume_from_checkpoint` cannot be set here", "resume.fromCheckpoint"],
        id="training.resume_from_checkpoint-reserved",
    ),
    pytest.param(
        {"training": {"report_to": "wandb"}},
        ["training: `report_to` cannot be set here", "tensorboard"],
        id="training.report_to-reserved",
    ),
    pytest.param({"training": [1, 2]}, ["training:", "valid dictionary"], id="training-not-mapping"),
    pytest.param({"bogus": 1}, ["bogus: unknown field"], id="unknown-top-level-field"),
    pytest.param({"adapter": "s3://x/adapter"}, ["adapter:", "invalid bucket name 'x'"], id="adapter-bad-s3-uri"),
    pytest.param(
        {"resume": {"fromCheckpoint": "s3://my-bucket//c"}},
        ["resume.fromCheckpoint:", "empty path segment"],
        id="resume.fromCheckpoint-bad-s3",
    ),
    pytest.param(
        {"resume": {"from_checkpoint": "gs://my-bucket/c"}},
        ["resume.from_checkpoint:", "is not an S3 URI"],
        id="resume.from_checkpoint-not-s3",
    ),
    pytest.param({"resume": {"warmStart": "maybe"}}, ["resume.warmStart:"], id="resume.warmStart-not-bool"),
    pytest.param({"maxSeqLength": 4}, ["maxSeqLength:", "greater than or equal to 8"], id="maxSeqLength-too-small"),
    pytest.param({"max_seq_length": "long"}, ["max_seq_length:", "valid integer"], id="max_seq_length-not-int"),
    pytest.param({"dtype": "int8"}, ["dtype:"], id="dtype-unknown"),
    pytest.param({"attempt": 0}, ["attempt:", "greater than or equal to 1"], id="attempt-zero"),
]


@pytest.mark.parametrize(("top", "expected"), INVALID)
def test_invalid_job_names_the_field(top: dict[str, Any], expected: list[str]) -> None:
    message = config_error(job_doc(**top))
    assert message.startswith("invalid job config: ")
    for part in expected:
        assert part in message


def test_every_bad_field_is_listed() -> None:
    message = config_error(job_doc(lora={"r": 0}, storage={"uri": "nope"}, extra=True))
    assert "lora.r:" in message
    assert "storage.uri:" in message
    assert "extra: unknown field" in message
    assert message.count("; ") == 2


def test_source_names_the_document() -> None:
    assert config_error(job_doc(storage={}), source="job.yaml").startswith("invalid job.yaml: storage.uri:")


@pytest.mark.parametrize(
    ("data", "type_name"),
    [
        pytest.param([MINIMAL], "list", id="list"),
        pytest.param("baseModel: x", "str", id="string"),
        pytest.param(None, "NoneType", id="empty-document"),
        pytest.param(42, "int", id="number"),
    ],
)
def test_non_mapping_document(data: Any, type_name: str) -> None:
    assert config_error(data) == f"job config must be a mapping of fields, got {type_name}"


def test_config_errors_are_permanent() -> None:
    with pytest.raises(ConfigError) as info:
        parse_job(job_doc(storage={}))
    assert info.value.permanent is True


def test_validation_error_sets_field_attribute() -> None:
    with pytest.raises(ConfigError) as info:
        parse_job(job_doc(lora={"r": 0}))
    assert info.value.field == "lora.r"


# --- DatasetSettings.custom_fields ---------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fields"),
    [
        pytest.param("alpaca", (), id="alpaca"),
        pytest.param("chat", (), id="chat"),
        pytest.param("Q: {question}\nA: {answer}", ("question", "answer"), id="two-fields-in-order"),
        pytest.param("{b} {a} {b}", ("b", "a"), id="duplicates-once-first-order"),
        pytest.param("{text!r:>20}", ("text",), id="conversion-and-spec"),
        pytest.param("{{not}} {real}", ("real",), id="escaped-braces"),
    ],
)
def test_custom_fields(template: str, fields: tuple[str, ...]) -> None:
    assert DatasetSettings(source="x.jsonl", template=template).custom_fields == fields


# --- load_job ------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", yaml.safe_dump({**MINIMAL, "maxSeqLength": 256, "lora": {"r": 4}}))
    job = load_job(path, environ={})
    assert (job.base_model, job.max_seq_length, job.lora.r) == ("unsloth/tiny-model", 256, 4)


def test_load_json_file(tmp_path: Path) -> None:
    path = write(tmp_path / "job.json", json.dumps({**MINIMAL, "load_in_4bit": False}))
    job = load_job(str(path), environ={})
    assert job.load_in_4bit is False
    assert job.storage.uri == "s3://my-bucket/jobs/one/"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(json.dumps({**MINIMAL, "name": "inline"}), id="json"),
        pytest.param("  " + json.dumps({**MINIMAL, "name": "inline"}), id="json-leading-space"),
        pytest.param(yaml.safe_dump({**MINIMAL, "name": "inline"}), id="yaml"),
    ],
)
def test_load_inline_from_env(text: str) -> None:
    job = load_job(environ={ENV_JOB: text})
    assert job.name == "inline"


def test_load_env_holding_a_file_path(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", yaml.safe_dump({**MINIMAL, "name": "from-file"}))
    assert load_job(environ={ENV_JOB: str(path)}).name == "from-file"


def test_env_file_path_is_named_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", yaml.safe_dump(job_doc(storage={})))
    with pytest.raises(ConfigError) as info:
        load_job(environ={ENV_JOB: str(path)})
    assert str(info.value).startswith(f"invalid {path}: storage.uri:")


def test_inline_env_is_named_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_job(environ={ENV_JOB: json.dumps(job_doc(lora={"r": 0}))})
    assert str(info.value).startswith(f"invalid ${ENV_JOB}: lora.r:")


def test_path_wins_over_env(tmp_path: Path) -> None:
    path = write(tmp_path / "job.json", json.dumps({**MINIMAL, "name": "path"}))
    assert load_job(path, environ={ENV_JOB: json.dumps({**MINIMAL, "name": "env"})}).name == "path"


def test_os_environ_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_JOB, json.dumps({**MINIMAL, "name": "process-env"}))
    monkeypatch.delenv(ENV_ATTEMPT, raising=False)
    assert load_job().name == "process-env"


@pytest.mark.parametrize(
    ("in_doc", "env_value", "expected"),
    [
        pytest.param(None, "3", 3, id="env-sets-attempt"),
        pytest.param(2, "5", 5, id="env-overrides-document"),
        pytest.param(2, "", 2, id="empty-env-ignored"),
    ],
)
def test_attempt_from_env(tmp_path: Path, in_doc: int | None, env_value: str, expected: int) -> None:
    doc = dict(MINIMAL) if in_doc is None else {**MINIMAL, "attempt": in_doc}
    path = write(tmp_path / "job.json", json.dumps(doc))
    assert load_job(path, environ={ENV_ATTEMPT: env_value}).attempt == expected
    assert load_job(environ={ENV_JOB: json.dumps(doc), ENV_ATTEMPT: env_value}).attempt == expected


@pytest.mark.parametrize(
    ("env_value", "expected"),
    [
        pytest.param("0", "attempt: Input should be greater than or equal to 1", id="zero"),
        pytest.param("two", "attempt: Input should be a valid integer", id="not-a-number"),
    ],
)
def test_bad_attempt_env(env_value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(environ={ENV_JOB: json.dumps(MINIMAL), ENV_ATTEMPT: env_value})
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({}, id="unset"),
        pytest.param({ENV_JOB: ""}, id="empty"),
        pytest.param({ENV_ATTEMPT: "2"}, id="only-attempt"),
    ],
)
def test_missing_config(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(environ=environ)
    message = str(info.value)
    assert "--config" in message
    assert ENV_JOB in message


@pytest.mark.parametrize(
    ("make_path", "strerror"),
    [
        pytest.param(lambda d: d / "missing.yaml", "No such file or directory", id="missing-file"),
        pytest.param(lambda d: d, "Is a directory", id="directory"),
        pytest.param(lambda d: write(d / "f", "x") / "job.yaml", "Not a directory", id="below-a-file"),
    ],
)
def test_unreadable_path(tmp_path: Path, make_path: Any, strerror: str) -> None:
    path = make_path(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_job(path, environ={})
    assert str(info.value) == f"cannot read job config {path}: {strerror}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("{baseModel: [unclosed", f"${ENV_JOB} is neither JSON nor YAML", id="neither-json-nor-yaml"),
        pytest.param("- a\n- b\n", f"${ENV_JOB} must be a mapping of fields, got list", id="yaml-list"),
        pytest.param("just words", f"${ENV_JOB} must be a mapping of fields, got str", id="yaml-scalar"),
    ],
)
def test_bad_inline_documents(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(environ={ENV_JOB: text})
    assert str(info.value).startswith(expected)


def test_empty_file_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "")
    with pytest.raises(ConfigError) as info:
        load_job(path, environ={})
    assert str(info.value) == f"{path} must be a mapping of fields, got NoneType"


def test_long_single_line_env_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_job(environ={ENV_JOB: "baseModel: " + "x" * 300})


def test_job_config_is_frozen() -> None:
    job = parse_job(job_doc())
    with pytest.raises(Exception, match="frozen"):
        job.attempt = 2  # type: ignore[misc]
    assert isinstance(job, JobConfig)
