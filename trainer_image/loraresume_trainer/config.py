"""The job config a trainer pod receives: one typed model, field-level errors.

Fields are snake_case; camelCase aliases (as in the LoraResume spec) are accepted too,
so the operator can hand over spec sections unchanged. Unknown fields are errors.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .s3uri import S3Uri

ENV_JOB = "LORARESUME_JOB"
ENV_ATTEMPT = "LORARESUME_ATTEMPT"

BUILTIN_TEMPLATES = ("alpaca", "chat")
DATASET_FORMATS = ("jsonl", "json", "parquet", "csv")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# SFTConfig fields the trainer owns: setting them would break durable or exact resume.
RESERVED_TRAINING_FIELDS = {
    "output_dir": "the trainer writes checkpoints to its work dir and uploads them to storage.uri",
    "overwrite_output_dir": "the trainer owns its output dir",
    "resume_from_checkpoint": "use resume.fromCheckpoint",
    "save_only_model": "a checkpoint without optimizer/scheduler/RNG state cannot resume exactly",
    "ignore_data_skip": "skipping the data fast-forward silently breaks exact resume",
    "save_total_limit": "use storage.keepCheckpoints",
    "save_strategy": "checkpoints are saved every training.save_steps steps",
    "report_to": "set `tensorboard: true`",
    "push_to_hub": "adapters are saved to <storage.uri>/adapter/",
    "hub_model_id": "adapters are saved to <storage.uri>/adapter/",
    "hub_token": "adapters are saved to <storage.uri>/adapter/",
    "dataset_text_field": "the template produces the text column",
    "gradient_checkpointing": "use the job's `gradient_checkpointing` (it sets Unsloth's and SFTConfig's together)",
}


def camel(name: str) -> str:
    """snake_case to the spec's camelCase: `load_in_4bit` -> `loadIn4bit`."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=camel, populate_by_name=True, frozen=True)


class LoraSettings(_Model):
    """LoRA shape for a new adapter (ignored when `adapter` is given: its own shape is used)."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(DEFAULT_TARGET_MODULES, min_length=1, description="Module names to adapt.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train with the LoRA.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")


class DatasetSettings(_Model):
    """Where the rows come from and how each becomes one training text."""

    source: str | None = Field(None, description="Local file, s3:// URI of a file, or omitted when `name` is set.")
    name: str | None = Field(None, description="A `datasets` dataset name (hub id or local script/dir).")
    split: str = Field("train", description="Split to train on.")
    format: Literal["jsonl", "json", "parquet", "csv"] | None = Field(
        None, description="File format; guessed from the file extension when omitted."
    )
    template: str = Field(
        "alpaca",
        description="`alpaca` (instruction / optional input / output columns), `chat` (tokenizer chat template "
        "over `messages_column`), or a format string with named fields such as `Q: {question}\\nA: {answer}`.",
    )
    messages_column: str = Field("messages", description="Column with chat messages for the `chat` template.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSettings:
        if bool(self.source) == bool(self.name):
            raise ValueError("set exactly one of `source` (a file or s3:// URI) or `name` (a datasets name)")
        return self

    @field_validator("source")
    @classmethod
    def _s3_source(cls, value: str | None) -> str | None:
        if value and value.startswith("s3://"):
            S3Uri.parse(value)  # a file, not a prefix: checked, kept as written
        return value

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value in BUILTIN_TEMPLATES:
            return value
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid format string ({exc})") from None
        if not fields:
            raise ValueError(
                f"unknown template {value!r}: expected one of {', '.join(BUILTIN_TEMPLATES)} "
                "or a format string with named fields like '{instruction}'"
            )
        if any(not f.isidentifier() for f in fields):
            raise ValueError("format-string fields must be plain column names like {question}")
        return value

    @property
    def custom_fields(self) -> tuple[str, ...]:
        """Column names a custom format-string template needs (empty for built-ins)."""
        if self.template in BUILTIN_TEMPLATES:
            return ()
        return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.template) if f))


class StorageSettings(_Model):
    """Where checkpoints, progress, logs and the final adapter live (any S3-compatible store)."""

    uri: str = Field(..., description="s3://bucket/prefix/ for this job.")
    endpoint: str | None = Field(None, description="S3 endpoint URL; empty for AWS.")
    region: str | None = Field(None, description="S3 region; empty for the environment's default.")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Complete checkpoints kept in S3 (newest first).")

    @field_validator("uri")
    @classmethod
    def _s3(cls, value: str) -> str:
        return str(S3Uri.parse(value).as_dir())

    @field_validator("endpoint", "region")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


class ResumeSettings(_Model):
    """Where a run starts; by default the newest complete checkpoint in `storage.uri`."""

    from_checkpoint: str | None = Field(
        None,
        description="s3:// URI of a checkpoint (…/checkpoints/checkpoint-N/) to start from; once this job has "
        "saved newer complete checkpoints of its own, those win, so a relaunch never goes back.",
    )
    warm_start: bool = Field(
        False,
        description="When the job's fingerprint differs from the checkpoint's, take only the adapter weights "
        "from the newest checkpoint and start a fresh schedule instead of refusing. Under the old run's own "
        "storage.uri only when the new run's steps end before that run's checkpoint steps (it never writes "
        "over them); otherwise use a new storage.uri with `fromCheckpoint`.",
    )

    extend: bool = Field(
        False,
        description="Extend a finished run: `fromCheckpoint` names its final checkpoint (under another "
        "storage.uri), resumed exactly (adapter, optimizer, scheduler, RNG, trainer state, data position) although "
        "this job is longer. Only `max_steps` and `num_train_epochs` may differ from the checkpoint's fingerprint "
        "(any other difference is refused, listing every one), and the job must train past it (`max_steps` above "
        "its step, or more `num_train_epochs` than it has done). The LR schedule is HF's, re-derived over the new "
        "total from the checkpoint's step: with `constant` (and `constant_with_warmup` past its warmup) the "
        "extension trains bitwise like one run of the new length; with `linear` or `cosine` the first new step "
        "runs at the old schedule's last LR (0) and the LR then jumps back up to the new schedule's value "
        "(see 'Extending a finished run' below). Not with `warmStart`. The job's own newer checkpoints win, so "
        "a relaunch continues from them.",
    )

    @field_validator("from_checkpoint")
    @classmethod
    def _s3(cls, value: str | None) -> str | None:
        return str(S3Uri.parse(value).as_dir()) if value else None

    @model_validator(mode="after")
    def _extend_needs_checkpoint(self) -> ResumeSettings:
        if self.extend and self.warm_start:
            raise ValueError(
                "`resume.extend` and `resume.warmStart` exclude each other: `extend` resumes the checkpoint's "
                "full trainer state exactly, `warmStart` takes only its adapter weights; set one of them"
            )
        if self.extend and not self.from_checkpoint:
            raise ValueError(
                "`resume.extend: true` needs `resume.fromCheckpoint`: the s3:// URI of the final checkpoint of "
                "the run to extend"
            )
        return self


class JobConfig(_Model):
    """One LoRA fine-tune job: the seed pipeline's parameters plus storage and resume settings."""

    name: str = Field("job", description="Job name, used in logs.")
    base_model: str = Field(..., min_length=1, description="Hub id, s3:// URI or local path of the base model.")
    max_seq_length: int = Field(
        2048, ge=8, le=1_048_576, description="Longest sequence in tokens; longer rows are truncated."
    )
    load_in_4bit: bool = Field(True, description="Load the base model 4-bit quantized (QLoRA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; `auto`: Unsloth's choice on a GPU, float32 on a CPU."
    )
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save GPU memory: `false` (none, fastest), "
        "`true` (standard), `unsloth` (standard, saved layer inputs offloaded to host memory: least memory, "
        "slowest), or `auto`: the fastest mode whose estimated peak memory fits the GPU with headroom "
        "(`false`, else `true`, else `unsloth`), and on a resume the mode the checkpoint was trained with. "
        "Sets Unsloth's `use_gradient_checkpointing` and SFTConfig's `gradient_checkpointing` together; "
        "recorded in the checkpoint fingerprint, so an explicit mode that differs from a checkpoint's is refused.",
    )
    adapter: str | None = Field(None, description="Saved LoRA adapter to continue from: s3:// URI or local dir.")
    lora: LoraSettings = LoraSettings()
    dataset: DatasetSettings
    training: dict[str, Any] = Field(
        default_factory=dict, description="TRL SFTConfig fields, passed through (validated against SFTConfig)."
    )
    storage: StorageSettings
    resume: ResumeSettings = ResumeSettings()
    tensorboard: bool = Field(
        False, description="Write TensorBoard event files and upload them to <storage.uri>/logs/."
    )
    attempt: int = Field(1, ge=1, description="Attempt number, set by the operator.")
    work_dir: Path = Field(Path("/tmp/loraresume"), description="Local scratch space.")
    termination_log: Path = Field(Path("/dev/termination-log"), description="Kubernetes termination message file.")

    @field_validator("training")
    @classmethod
    def _not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED_TRAINING_FIELDS:
                raise ValueError(f"`{key}` cannot be set here: {RESERVED_TRAINING_FIELDS[key]}")
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads an unquoted true/false as a boolean; they mean the modes of the same name.
        return str(value).lower() if isinstance(value, bool) else value

    @field_validator("adapter")
    @classmethod
    def _adapter_uri(cls, value: str | None) -> str | None:
        if value and value.startswith("s3://"):
            return str(S3Uri.parse(value).as_dir())
        return value or None

    @property
    def seed(self) -> int:
        return int(self.training.get("seed", 3407))


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `dotted.field: message`, as a person fixing the YAML needs it."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(job)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_job(data: Any, *, source: str = "job config") -> JobConfig:
    """Validate a parsed document; raises ConfigError listing every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of fields, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        field = ".".join(str(p) for p in first) or None
        error = ConfigError(f"invalid {source}: {format_validation_error(exc)}")
        error.field = field  # the message already names every field
        raise error from None


def _is_file_path(text: str) -> bool:
    """$LORARESUME_JOB may hold the config itself or a path to it."""
    if "\n" in text or text.lstrip().startswith("{"):
        return False
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long for a file name, NUL bytes: it is config text
        return False


def load_job(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> JobConfig:
    """Read the job from `path`, else from $LORARESUME_JOB (JSON or YAML text, or a file path).

    $LORARESUME_ATTEMPT, when set, overrides `attempt` (the operator bumps it per pod).
    """
    env = os.environ if environ is None else environ
    if path is not None:
        try:
            text, source = Path(path).read_text(), str(path)
        except OSError as exc:
            raise ConfigError(f"cannot read job config {path}: {exc.strerror}") from None
    elif env.get(ENV_JOB):
        text, source = env[ENV_JOB], f"${ENV_JOB}"
        if _is_file_path(text):
            text, source = Path(text).read_text(), text
    else:
        raise ConfigError(f"no job config: pass --config PATH or set ${ENV_JOB}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} is neither JSON nor YAML: {exc}") from None
    if isinstance(data, dict) and env.get(ENV_ATTEMPT):
        data = {**data, "attempt": env[ENV_ATTEMPT]}
    return parse_job(data, source=source)
