"""The LoraResume resource: one typed model of spec and status, the single source of truth.

The CRD in crds/ is generated from these models (`python -m loraresume_operator.crd`);
the trainer's own sections (`lora`, `dataset`) are reused as they are, so the resource and
the job config a pod receives cannot disagree. Field descriptions become `kubectl explain`.
"""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraresume_trainer.config import RESERVED_TRAINING_FIELDS, DatasetSettings, LoraSettings, camel
from loraresume_trainer.s3uri import S3Uri

from . import k8s_names

GROUP = "loraresume.dev"
VERSION = "v1alpha1"
KIND = "LoraResume"
PLURAL = "loraresumes"
SINGULAR = "loraresume"
SHORT_NAMES = ["lr"]
CATEGORIES = ["all", "ml"]
API_VERSION = f"{GROUP}/{VERSION}"

# Quantity as the API server accepts it (e.g. 48Gi, 500m, 2).
QUANTITY_PATTERN = k8s_names.QUANTITY_PATTERN
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=camel, populate_by_name=True, frozen=True)


def immutable(message: str) -> dict[str, Any]:
    """CEL rule for fields that define the run: changing them mid-run would break exact resume."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": message}]}


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


def training_immutable_rule() -> str:
    """`self == oldSelf` for spec.training's typed fields.

    Not for `extra`: the API server stores a JSON 1.0 there as 1, and CEL's `==` on schemaless
    values tells an int from a double, so a server-side apply or PUT of an unchanged manifest
    would be refused as a change (and CEL cannot index a schemaless object to compare it by
    value). The operator holds a changed `extra` instead (`TrainingSpec.extra_digest`, decide).
    Nor for the logging and save cadence (MUTABLE_TRAINING_FIELDS): they do not change the
    trajectory, so an edit is taken up by the next attempt.
    """
    keys = [
        info.alias or name
        for name, info in TrainingSpec.model_fields.items()
        if name != "extra" and name not in MUTABLE_TRAINING_FIELDS
    ]
    return " && ".join(
        f"(has(self.{key}) == has(oldSelf.{key}) && (!has(self.{key}) || self.{key} == oldSelf.{key}))" for key in keys
    )


# Set or unset, storage.uri stays as it was created (an unset one resolves to the operator's prefix).
STORAGE_URI_IMMUTABLE = "has(self.uri) == has(oldSelf.uri) && (!has(self.uri) || self.uri == oldSelf.uri)"


def _s3_uri(value: str | None) -> str | None:
    """The trainer's own S3 URI rules (bucket naming, no empty or '..' segments), stricter than the
    CRD's pattern: refused here, the resource fails naming the field instead of every reconcile
    tripping over it."""
    if value is not None:
        S3Uri.parse(value)
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    problem = k8s_names.labels_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _dns_subdomain(value: str | None) -> str | None:
    problem = value is not None and k8s_names.dns_subdomain_problem(value)
    if problem:
        raise ValueError(problem)
    return value


DEFAULT_MAX_STEPS = 60  # the seed notebook's
STEPS_OR_EPOCHS = "set training.maxSteps or training.numTrainEpochs, not both"
# SFTConfig fields that other parts of the spec set (the trainer's own list is RESERVED_TRAINING_FIELDS).
SPEC_OWNED_TRAINING_FIELDS = {"max_length": "set spec.maxSeqLength (Unsloth and TRL both take it from there)"}
# Training fields that do not change the trajectory: they may be edited mid-run (a relaunch uses them).
MUTABLE_TRAINING_FIELDS = ("logging_steps", "save_steps")

_NEW_RESOURCE = "is immutable: it defines the run; create a new LoraResume (with a new storage.uri) instead"


class AdapterSource(_Spec):
    """The saved LoRA adapter to start from: an S3 URI, or another LoraResume in this namespace."""

    uri: str | None = Field(None, pattern=S3_URI_PATTERN, description="s3:// URI of a saved adapter directory.")
    from_resource: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of another LoraResume in this namespace; this one waits until it has Succeeded and "
        "starts from its output adapter (curriculum stages, continuations).",
    )

    _uri = field_validator("uri")(lambda v: _s3_uri(v))

    @model_validator(mode="after")
    def _one(self) -> AdapterSource:
        if bool(self.uri) == bool(self.from_resource):
            raise ValueError("set exactly one of `uri` or `fromResource`")
        return self


EXTEND_ALONE = "resume.extendFrom continues another run exactly: it cannot be combined with resume.{other}"
EXTEND_NOT_ADAPTER = (
    "resume.extendFrom continues its predecessor's adapter, optimizer and schedule: it cannot also start "
    "from spec.adapter"
)


class ResumeSpec(_Spec):
    """Where the run starts, if not from scratch (and, after the first attempt, from its own newest
    checkpoint, which always wins: a relaunch never goes back)."""

    from_checkpoint: str | None = Field(
        None,
        pattern=S3_URI_PATTERN,
        description="s3:// URI of a complete checkpoint of another run (…/checkpoints/checkpoint-N/) to start "
        "from: resumed exactly if that run's fingerprint equals this job's, else refused (or, with warmStart, "
        "its adapter weights start a new schedule).",
    )
    warm_start: bool = Field(
        False,
        description="If the checkpoint to start from (fromCheckpoint, or earlier checkpoints in storage.uri) "
        "was made by a different job, start a new schedule from its adapter weights instead of failing.",
    )
    extend_from: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of a LoraResume in this namespace whose finished run this one extends: it waits until "
        "that one has Succeeded, then resumes exactly from its final checkpoint (adapter, optimizer, LR "
        "scheduler, RNG and data position kept) and trains on to this job's longer training.maxSteps or "
        "numTrainEpochs; only the run's length may differ. The learning-rate schedule is re-derived over the "
        "new total as transformers does: with `constant` the result equals one longer run. Needs its own "
        "storage.uri.",
    )

    _uri = field_validator("from_checkpoint")(lambda v: _s3_uri(v))

    @model_validator(mode="after")
    def _extend_alone(self) -> ResumeSpec:
        if self.extend_from and self.from_checkpoint:
            raise ValueError(EXTEND_ALONE.format(other="fromCheckpoint"))
        if self.extend_from and self.warm_start:
            raise ValueError(EXTEND_ALONE.format(other="warmStart"))
        return self


class TrainingSpec(_Spec):
    """The TRL SFTConfig of the run. Common fields are typed; any other SFTConfig field goes in `extra`."""

    per_device_train_batch_size: int = Field(2, ge=1, le=4096, description="Rows per device per forward pass.")
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096, description="Forward passes per optimizer step.")
    warmup_steps: int = Field(5, ge=0, description="Linear learning-rate warmup steps.")
    max_steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description=f"Optimizer steps of the whole run; {DEFAULT_MAX_STEPS} when neither this nor numTrainEpochs "
        "is set.",
    )
    num_train_epochs: float | None = Field(
        None,
        gt=0,
        le=100_000,
        description="Train for this many passes over the dataset instead of a step count (the steps follow from "
        "the dataset's size, batch size and accumulation, as in transformers); set this or maxSteps, not both.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    optim: str = Field("adamw_8bit", min_length=1, description="Optimizer name as TRL/transformers know it.")
    weight_decay: float = Field(0.01, ge=0, description="Weight decay.")
    lr_scheduler_type: str = Field("linear", min_length=1, description="Learning-rate schedule.")
    logging_steps: int = Field(1, ge=1, description="Steps between progress reports (status, progress.json).")
    save_steps: int = Field(10, ge=1, description="Steps between checkpoints (each is uploaded to S3).")
    seed: int = Field(3407, ge=0, description="Seed of LoRA initialisation, data order and dropout.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Other SFTConfig fields, snake_case as in TRL (e.g. {max_grad_norm: 0.3}); unknown ones "
        "fail the attempt with a message naming the field.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingSpec:
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError(STEPS_OR_EPOCHS)
        return self

    @field_validator("extra")
    @classmethod
    def _no_owned_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        refusals = extra_refusals()
        owned = [key for key in value if key in refusals]
        if owned:
            raise ValueError("; ".join(refusals[key] for key in owned))
        return value

    def planned_steps(self) -> int | None:
        """The run's optimizer steps as the spec says them; None when they follow from epochs."""
        if self.num_train_epochs is not None:
            return None
        return self.max_steps or DEFAULT_MAX_STEPS

    def extra_digest(self) -> str:
        """Identifies `extra` by value: 1 and 1.0 are the same number (JSON, and the API server, agree)."""
        canonical = json.dumps(_integral_floats_as_ints(self.extra), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def sft_config(self) -> dict[str, Any]:
        """The trainer's `training` section (snake_case SFTConfig fields)."""
        typed = self.model_dump(exclude={"extra", "max_steps", "num_train_epochs"})
        steps = self.planned_steps()
        if steps is None:
            length: dict[str, Any] = {"num_train_epochs": self.num_train_epochs, "max_steps": -1}  # -1: by epochs
        else:
            length = {"max_steps": steps}
        return {**self.extra, **typed, **length}


def extra_refusals() -> dict[str, str]:
    """`training.extra` keys the resource sets elsewhere, each with the message that says where.

    A typed field's key in `extra` (either spelling) would be silently overridden by the typed
    value; the trainer-owned SFTConfig fields would break durable or exact resume.
    """
    out: dict[str, str] = {}
    for name, info in TrainingSpec.model_fields.items():
        if name == "extra":
            continue
        alias = info.alias or name
        for key in dict.fromkeys((name, alias)):
            out[key] = f"extra.{key} is a typed field: set spec.training.{alias} instead"
    for key, why in {**RESERVED_TRAINING_FIELDS, **SPEC_OWNED_TRAINING_FIELDS}.items():
        out.setdefault(key, f"extra.{key} cannot be set: {why}")
    return out


class StorageSpec(_Spec):
    """Where checkpoints, progress and the adapter live."""

    uri: str | None = Field(
        None,
        pattern=S3_URI_PATTERN,
        description="s3://bucket/prefix/ for this run; empty for the operator's default prefix + "
        "<namespace>/<name>/ (Helm value storage.uriPrefix). The resolved location is in status.storageUri.",
    )
    endpoint: str | None = Field(
        None, description="S3 endpoint URL for S3-compatible stores; empty for the operator's default (AWS if none)."
    )
    region: str | None = Field(None, description="S3 region; empty for the operator's default or the environment's.")
    credentials_secret: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN); "
        "empty for the operator's default Secret, or, if it has none, the pod's service-account identity (e.g. IRSA).",
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Complete checkpoints kept in S3, newest first.")

    _uri = field_validator("uri")(lambda v: _s3_uri(v))
    delete_on_resource_deletion: bool = Field(
        False,
        description="Delete the checkpoints and compile caches in S3 when the resource is deleted "
        "(the adapter is kept). While true, the resource carries the operator's finalizer "
        "loraresume.dev/cleanup: its deletion waits until they are deleted.",
    )


class ResourcesSpec(_Spec):
    """What the trainer pod requests (and is limited to)."""

    gpus: int = Field(1, ge=0, le=64, description="nvidia.com/gpu count.")
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN, description="CPU request, e.g. 8.")
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN, description="Memory request and limit, e.g. 48Gi.")
    ephemeral_storage: str | None = Field(
        None,
        pattern=QUANTITY_PATTERN,
        description="The pod's ephemeral-storage request, e.g. 100Gi; empty: the scratch size plus /tmp's limit.",
    )
    scratch_size: str | None = Field(
        None,
        pattern=QUANTITY_PATTERN,
        description="sizeLimit of the scratch volume (/work: base model, dataset, checkpoints, compile caches); "
        "empty: derived per attempt from the sizes in S3 of the base model, adapter, dataset and newest "
        "checkpoint (64Gi allowed for a hub model id), plus 8Gi for caches. Outgrowing it gets the pod evicted, "
        "reported as a disk eviction.",
    )


class Toleration(_Spec):
    """A core/v1 Toleration: lets the trainer pod schedule onto nodes with a matching taint."""

    key: str | None = Field(None, description="Taint key to tolerate; empty with operator Exists matches all taints.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (the default).")
    value: str | None = Field(None, description="Taint value the toleration matches (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, le=2**31, description="With effect NoExecute: how long the pod stays bound after the taint appears."
    )

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> Toleration:
        if self.key and (problem := k8s_names.label_key_problem(self.key)):
            raise ValueError(problem)
        if self.operator == "Exists" and self.value:
            raise ValueError("`value` must be empty when `operator` is Exists")
        if not self.key and self.operator != "Exists":
            raise ValueError("`operator` must be Exists when `key` is empty")
        if self.operator != "Exists" and self.value and (problem := k8s_names.label_value_problem(self.value)):
            raise ValueError(problem)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("`tolerationSeconds` needs `effect: NoExecute`")
        return self


class SpotSpec(_Spec):
    """Spot (preemptible) placement, and the on-demand fallback after repeated preemptions."""

    enabled: bool = Field(False, description="Place attempts on spot nodes until the fallback triggers.")
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels for spot nodes; with `tolerations` also empty, the operator's defaults "
        "(Helm values spot.nodeSelector and spot.tolerations) apply.",
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for spot node taints.")
    fallback_to_on_demand_after: int | None = Field(
        None, ge=1, description="After this many preemptions, attempts drop the spot selector and tolerations."
    )
    pending_timeout_seconds: int = Field(
        600,
        ge=1,
        le=604_800,
        description="An attempt unschedulable on spot nodes this long moves to on-demand nodes (a new attempt, "
        "counted in status.spotTimeouts: neither a preemption nor a failure).",
    )
    _selectors = field_validator("node_selector", "on_demand_node_selector")(lambda v: _labels(v))

    on_demand_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels once the job has fallen back to on-demand nodes; empty for the operator's "
        "default (Helm value spot.onDemandNodeSelector).",
    )


class SchedulingSpec(_Spec):
    """Placement of the trainer pod; changes apply to the next attempt."""

    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels every attempt needs.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations every attempt gets.")
    affinity: dict[str, Any] | None = Field(
        None,
        description="A core/v1 Affinity, passed to the pod as is.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the trainer pod.")

    _node_selector = field_validator("node_selector")(lambda v: _labels(v))
    _priority_class = field_validator("priority_class_name")(lambda v: _dns_subdomain(v))
    spot: SpotSpec = Field(default_factory=SpotSpec, description="Spot placement and on-demand fallback.")


class RestartPolicySpec(_Spec):
    """Bounded retries: preemptions and failures are counted apart (DESIGN: preemption is not failure)."""

    max_preemptions: int = Field(50, ge=0, le=100_000, description="Preemptions tolerated before the job fails.")
    max_disk_evictions: int = Field(
        3,
        ge=0,
        le=10_000,
        description="Evictions for disk (the node low on ephemeral-storage, or the scratch volume over its "
        "sizeLimit) tolerated before the job fails; each relaunches at once, counted apart from preemptions.",
    )
    backoff_limit: int = Field(3, ge=0, le=10_000, description="Failed attempts (crash, OOM, non-zero exit) retried.")
    backoff_seconds: int = Field(
        10, ge=1, le=86_400, description="Delay before the first retry after a failure; doubles (at most a day)."
    )
    max_backoff_seconds: int = Field(
        600, ge=1, le=604_800, description="Cap of the doubling retry delay (at most a week)."
    )
    image_pull_timeout_seconds: int = Field(
        300,
        ge=1,
        le=86_400,
        description="A trainer image the kubelet cannot pull for this long fails the job (a config error).",
    )


class LoraResumeSpec(_Spec):
    """A resumable LoRA fine-tune: base model + adapter + dataset, trained in a pod, checkpointed to S3."""

    base_model: str = Field(
        ...,
        min_length=1,
        description="Hub id, s3:// URI or path in the image of the base model.",
        json_schema_extra=immutable(f"baseModel {_NEW_RESOURCE}"),
    )
    max_seq_length: int = Field(
        2048,
        ge=8,
        le=1_048_576,
        description="Longest sequence in tokens.",
        json_schema_extra=immutable(f"maxSeqLength {_NEW_RESOURCE}"),
    )
    load_in_4bit: bool = Field(True, description="Load the base model 4-bit quantized (QLoRA).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Compute dtype.")
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = Field(
        "auto",
        description="Recompute activations in the backward pass to save GPU memory: `false` (none, fastest), "
        "`true`, `unsloth` (layer inputs offloaded to host memory: least GPU memory, slowest), or `auto`: the "
        "fastest that fits the GPU, and on a resume the mode its checkpoint was trained with. Quote true/false "
        "in YAML (strings, not booleans).",
        json_schema_extra=immutable(f"gradientCheckpointing {_NEW_RESOURCE}"),
    )
    adapter: AdapterSource | None = Field(
        None,
        description="The saved adapter to start from; omit to train a new LoRA (see `lora`).",
        json_schema_extra=immutable(f"adapter {_NEW_RESOURCE}"),
    )
    lora: LoraSettings = Field(
        default_factory=LoraSettings,
        description="Shape of a new LoRA (ignored when `adapter` is set).",
        json_schema_extra=immutable(f"lora {_NEW_RESOURCE}"),
    )
    dataset: DatasetSettings = Field(
        ...,
        description="Training rows and the template that turns each into text.",
        json_schema_extra=immutable(f"dataset {_NEW_RESOURCE}"),
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="The training schedule (TRL SFTConfig).",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": training_immutable_rule(), "message": f"training {_NEW_RESOURCE}"}]
        },
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec,
        description="S3 location of checkpoints, progress and the output adapter.",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": STORAGE_URI_IMMUTABLE, "message": f"storage.uri {_NEW_RESOURCE}"}]
        },
    )
    resume: ResumeSpec = Field(
        default_factory=ResumeSpec, description="Where the run starts: another run's checkpoint, or a run it extends."
    )
    warm_start: bool = Field(
        False,
        description="Deprecated (v1alpha1): the same as resume.warmStart, which takes precedence when set.",
    )
    tensorboard: bool = Field(False, description="Upload TensorBoard event files to <storage.uri>/logs/.")
    suspend: bool = Field(
        False,
        description="True stops the running attempt gracefully (SIGTERM: the trainer saves a checkpoint) and starts "
        "none until false again, which resumes from that checkpoint; neither a preemption nor a failure.",
    )
    image: str | None = Field(None, description="Trainer image; empty for the operator's default.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(None, description="Image pull policy.")
    service_account_name: str | None = Field(
        None, max_length=253, description="Service account of the trainer pod (for workload identity such as IRSA)."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pod resources.")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Pod placement.")
    restart_policy: RestartPolicySpec = Field(default_factory=RestartPolicySpec, description="Retry budgets.")
    termination_grace_period_seconds: int | None = Field(
        None,
        ge=5,
        le=3600,
        description="Time between SIGTERM and SIGKILL: the trainer saves and uploads a checkpoint in it "
        "(GKE spot: 15 s default, up to 120 s with a node setting; AWS spot: 2-minute notice). Empty for the "
        "operator's default (Helm value trainer.terminationGracePeriodSeconds, 120 s unless changed).",
    )

    _service_account = field_validator("service_account_name")(lambda v: _dns_subdomain(v))

    @model_validator(mode="after")
    def _extend_not_adapter(self) -> LoraResumeSpec:
        if self.resume.extend_from and self.adapter is not None:
            raise ValueError(EXTEND_NOT_ADAPTER)
        if self.resume.extend_from and self.warm_start:
            raise ValueError(EXTEND_ALONE.format(other="warmStart (spec.warmStart)"))
        return self

    @property
    def warm_starts(self) -> bool:
        return self.resume.warm_start or self.warm_start

    @property
    def storage_root(self) -> S3Uri:
        if not self.storage.uri:
            raise ValueError("storage.uri is not resolved (no operator default prefix applied)")
        return S3Uri.parse(self.storage.uri).as_dir()


class Phase(str, enum.Enum):
    """Where a LoraResume is in its life."""

    PENDING = "Pending"  # accepted; waiting for its adapter source or its first pod
    RUNNING = "Running"  # a trainer pod is running
    RESUMING = "Resuming"  # the last pod ended (preemption or failure); the next attempt is due
    SUSPENDED = "Suspended"  # spec.suspend: no pod; the next attempt resumes from the newest checkpoint
    SUCCEEDED = "Succeeded"  # adapter durable in S3 (terminal)
    FAILED = "Failed"  # budgets exhausted or a permanent error (terminal)

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class CheckpointRef(_Spec):
    """A complete (manifest-verified) checkpoint in S3."""

    uri: str = Field(..., description="s3:// URI of the checkpoint directory.")
    step: int = Field(..., description="Training step the checkpoint was saved at.")


class StartupPhase(_Spec):
    """One phase of a trainer's start-up, as the trainer measured it."""

    phase: str = Field(..., description="imports_done, inputs_ready, checkpoint_verified, model_loaded, ...")
    at_seconds: float = Field(..., ge=0, description="Seconds from the trainer process's start to this phase's end.")
    took_seconds: float = Field(..., ge=0, description="Seconds this phase took (since the phase before).")


class LastStartup(_Spec):
    """Where the newest attempt's start-up time went (the trainer's progress.json `startup`)."""

    attempt: int = Field(..., ge=0, description="The attempt these phases belong to.")
    seconds: float = Field(
        ..., ge=0, description="Process start to the last phase reached (first_step: the whole start-up)."
    )
    phases: list[StartupPhase] = Field(default_factory=list, description="The phases reached, in order.")


class Condition(_Spec):
    """Standard Kubernetes condition."""

    type: str = Field(..., description="Condition type, e.g. Succeeded or Failed.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details of the last transition.")
    last_transition_time: str = Field(..., description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation the condition reflects.")


class LoraResumeStatus(_Spec):
    """Observed state, written by the operator only."""

    model_config = ConfigDict(extra="ignore", alias_generator=camel, populate_by_name=True, frozen=True)

    phase: Phase = Field(Phase.PENDING, description="Pending, Running, Resuming, Suspended, Succeeded or Failed.")
    message: str = Field("", description="What is happening, for people.")
    attempt: int = Field(0, ge=0, description="Trainer pods started so far.")
    preemptions: int = Field(0, ge=0, description="Attempts ended by preemption (not failures).")
    failures: int = Field(0, ge=0, description="Attempts ended by a failure.")
    step: int = Field(0, ge=0, description="Last training step reported in progress.json.")
    max_steps: int = Field(0, ge=0, description="Steps of the whole run.")
    progress: str = Field("", description="step/maxSteps, for kubectl get.")
    loss: str = Field("", description="Last logged training loss.")
    storage_uri: str | None = Field(
        None,
        description="Where this run's checkpoints, progress and adapter live (spec.storage.uri, or the "
        "operator's default prefix + <namespace>/<name>/, fixed when first resolved).",
    )
    latest_checkpoint: CheckpointRef | None = Field(None, description="Newest complete checkpoint in S3.")
    output_adapter: str | None = Field(None, description="S3 URI of the final adapter, once saved.")
    lost_steps: int = Field(0, ge=0, description="Steps trained but not durable when attempts ended, summed.")
    pod_name: str | None = Field(None, description="The current attempt's pod.")
    last_attempt_ended: str | None = Field(None, description="When the last pod ended (RFC 3339).")
    next_attempt_after: str | None = Field(None, description="Backoff: no new pod before this time (RFC 3339).")
    on_demand: bool = Field(False, description="True once the job has fallen back from spot to on-demand nodes.")
    pending_since: str | None = Field(
        None, description="Since when the current attempt's pod has waited to start (its creation, RFC 3339)."
    )
    pending_reason: str | None = Field(None, description="Why the current attempt's pod has not started.")
    spot_timeouts: int = Field(
        0, ge=0, description="Attempts moved to on-demand nodes after scheduling.spot.pendingTimeoutSeconds."
    )
    disk_evictions: int = Field(
        0, ge=0, description="Attempts evicted for disk (node low on ephemeral-storage, scratch over its sizeLimit)."
    )
    foreign_checkpoints: list[int] = Field(
        default_factory=list,
        description="Steps of complete checkpoints under the storage prefix made by another job (another "
        "fingerprint, as the trainer reported): kept, never resumed from nor written over.",
    )
    last_startup: LastStartup | None = Field(
        None, description="The newest attempt's start-up, by phase (imports, downloads, restore, first step)."
    )
    training_extra_digest: str | None = Field(
        None, description="Digest of spec.training.extra when the first attempt started; a changed extra holds the job."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Succeeded, Failed, ...",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int = Field(0, ge=0, description="The spec generation the status reflects.")
