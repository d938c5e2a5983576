"""Which gradient-checkpointing mode a job trains with: a pure decision from shapes and memory.

The modes, fastest first (8B shape on an H200, benchmarks/RESULTS.md, issue 16):

- ``false``: no recompute. Every decoder layer's activations stay on the GPU until the backward
  pass: the most memory, a third fewer FLOPs than the others.
- ``true``: standard checkpointing. Only each layer's input stays; the layer's forward runs again
  in the backward pass.
- ``unsloth``: Unsloth's checkpointing: as ``true``, with the saved layer inputs offloaded to host
  memory. The least GPU memory, and the slowest.

``auto`` takes the fastest mode whose estimated peak fits the GPU with headroom, trying ``false``,
then ``true``, then ``unsloth``; with no mode fitting it takes ``unsloth`` (the least memory).

The estimate, per micro-batch of ``tokens`` (batch x max_seq_length, the most a padded or
padding-free batch can hold):

    peak = weights + LoRA state + saved activations + one layer's transient + workspace

- weights: 4-bit (nf4 with double-quantized absmax, ~0.516 bytes per parameter) decoder linears,
  embedding and lm_head in the compute dtype (Unsloth keeps them so); unquantized: all parameters
  in the compute dtype.
- LoRA state: fp32 parameters and gradients plus the optimizer's state (adamw_8bit: 2 bytes per
  parameter, torch AdamW: 8).
- saved activations: ``false`` keeps ``layers x tokens x A`` bytes, A = dtype bytes x
  (4 hidden + 2 kv width + 3 intermediate) per token per layer (the inputs of the LoRA'd
  projections, q/k/v and the attention output, the MLP's gate, up and product); ``true`` keeps
  each layer's input (``layers x tokens x hidden``); ``unsloth`` keeps two such inputs on the GPU
  (the offload's double buffer).
- one layer's transient: ``tokens x A`` (the layer being recomputed, or run backward).
- workspace: two dequantized copies of the largest linear (4-bit) and a quarter of the micro-batch's
  logits in the compute dtype (the loss is computed in chunks).

The coefficients were fitted to the peaks measured on the 8B shape (issue 16's table); the JSON
written by ``benchmarks/gpu_bench.py --speed`` holds estimate against measurement for every mode.
No torch here: the trainer imports this before the heavy libraries, the tests run it on tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

GiB = 1 << 30

Requested = Literal["auto", "unsloth", "true", "false"]
Mode = Literal["false", "true", "unsloth"]
REQUESTED_VALUES: tuple[str, ...] = ("auto", "unsloth", "true", "false")
# Fastest first: the order `auto` tries them in.
MODES_FASTEST_FIRST: tuple[Mode, ...] = ("false", "true", "unsloth")
LOWEST_MEMORY: Mode = "unsloth"
# What a checkpoint saved before the mode was recorded was trained with (model_loading hard-coded it).
LEGACY_MODE: Mode = "unsloth"
FINGERPRINT_KEY = "gradient_checkpointing"

# A mode fits when  peak * (1 + HEADROOM_FRACTION) + RESERVED_BYTES <= GPU total memory.
# RESERVED_BYTES: CUDA context, cuBLAS workspaces and what the allocator holds beyond its peak.
HEADROOM_FRACTION = 0.10
RESERVED_BYTES = 2 * GiB

# Activation elements saved per token per decoder layer without checkpointing, in units of
# (hidden, kv width, intermediate): fitted to the 8B shape's measured peak (20.9 GiB at 4,096 tokens).
ACTIVATION_COEFFICIENTS = (4.0, 2.0, 3.0)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit absmax per 64 + fp32 per 256 absmax
OPTIMIZER_STATE_BYTES = {"adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "adamw_bnb_8bit": 2.0}
DEFAULT_OPTIMIZER_STATE_BYTES = 8.0  # two fp32 moments
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def to_unsloth(mode: Mode) -> bool | str:
    """The value of Unsloth's `use_gradient_checkpointing` for a mode."""
    values: dict[str, bool | str] = {"false": False, "true": True, "unsloth": "unsloth"}
    return values[mode]


def sft_gradient_checkpointing(mode: Mode) -> bool:
    """SFTConfig's `gradient_checkpointing`: off only for `false` (TRL's default True would turn it back on)."""
    return mode != "false"


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (read from its config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face config dict (a multimodal one's `text_config` too). Raises ValueError."""
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                vocab=int(config["vocab_size"]),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"not a decoder config the estimate knows ({type(exc).__name__}: {exc})") from None
        if min(shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab, shape.head_dim) <= 0:
            raise ValueError("not a decoder config the estimate knows (a size is zero)")
        return shape

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def embedding_params(self) -> int:
        """Embedding plus lm_head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tie_word_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int, targets: Iterable[str]) -> int:
        linears = self.linears()
        return self.layers * sum(r * sum(linears[t]) for t in set(targets) if t in linears)


@dataclass(frozen=True)
class Estimate:
    """Estimated peak GPU bytes of training in one mode, by part."""

    mode: Mode
    weights: int
    lora_state: int
    saved_activations: int
    transient: int
    workspace: int

    @property
    def peak(self) -> int:
        return self.weights + self.lora_state + self.saved_activations + self.transient + self.workspace

    def as_gib(self) -> dict[str, float]:
        parts = ("weights", "lora_state", "saved_activations", "transient", "workspace")
        return {**{p: round(getattr(self, p) / GiB, 2) for p in parts}, "peak": round(self.peak / GiB, 2)}


@dataclass(frozen=True)
class Workload:
    """Everything besides the model shape that decides the memory of a step."""

    tokens: int  # per micro-batch: per_device_train_batch_size x max_seq_length
    dtype: str = "bfloat16"  # compute dtype
    load_in_4bit: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    optim: str = "adamw_8bit"


def activation_bytes_per_token_layer(shape: ModelShape, dtype_bytes: int) -> float:
    a_h, a_kv, a_i = ACTIVATION_COEFFICIENTS
    return dtype_bytes * (a_h * shape.hidden + a_kv * shape.kv_width + a_i * shape.intermediate)


def estimate(shape: ModelShape, work: Workload, mode: Mode) -> Estimate:
    """Peak GPU bytes of a training step in `mode` (see the module docstring for the parts)."""
    if mode not in MODES_FASTEST_FIRST:
        raise ValueError(f"unknown gradient checkpointing mode {mode!r}")
    db = DTYPE_BYTES.get(work.dtype, 2)
    if work.load_in_4bit:
        weights = shape.linear_params * NF4_BYTES_PER_PARAM + (shape.embedding_params + shape.norm_params) * db
        largest = max(a * b for a, b in shape.linears().values())
        dequant = 2 * largest * db
    else:
        weights = (shape.linear_params + shape.embedding_params + shape.norm_params) * db
        dequant = 0
    n_lora = shape.lora_params(work.lora_r, work.lora_targets)
    lora_state = n_lora * (4 + 4 + OPTIMIZER_STATE_BYTES.get(work.optim, DEFAULT_OPTIMIZER_STATE_BYTES))
    per_layer = work.tokens * activation_bytes_per_token_layer(shape, db)
    layer_input = work.tokens * shape.hidden * db
    saved = {"false": shape.layers * per_layer, "true": shape.layers * layer_input, "unsloth": 2 * layer_input}[mode]
    workspace = dequant + work.tokens * shape.vocab * db / 4
    return Estimate(mode, int(weights), int(lora_state), int(saved), int(per_layer), int(workspace))


def fits(peak_bytes: int, gpu_total_bytes: int) -> bool:
    return peak_bytes * (1 + HEADROOM_FRACTION) + RESERVED_BYTES <= gpu_total_bytes


@dataclass(frozen=True)
class Decision:
    """The mode a run trains with, and why."""

    requested: str
    mode: Mode
    reason: str
    estimates: dict[str, Estimate] = field(default_factory=dict)
    gpu_total_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able, for the log event."""
        return {
            "requested": self.requested,
            "mode": self.mode,
            "reason": self.reason,
            "gpu_total_gib": round(self.gpu_total_bytes / GiB, 2) if self.gpu_total_bytes else None,
            "estimated_peak_gib": {m: e.as_gib()["peak"] for m, e in self.estimates.items()},
        }


def choose(
    requested: str,
    shape: ModelShape | None,
    work: Workload,
    gpu_total_bytes: int | None,
    *,
    kept: str | None = None,
) -> Decision:
    """The mode to train with.

    `kept`: the mode of the checkpoint this run resumes (see `kept_mode`); `auto` keeps it, so a
    resume never changes mode silently (an explicit mode that differs is refused by the
    fingerprint comparison instead). `shape` None: the model's config could not be read.
    `gpu_total_bytes` None: no GPU (CPU training; no GPU memory to fit).
    """
    if requested not in REQUESTED_VALUES:
        raise ValueError(f"gradient_checkpointing must be one of {', '.join(REQUESTED_VALUES)}, got {requested!r}")
    estimates: dict[str, Estimate] = (
        {m: estimate(shape, work, m) for m in MODES_FASTEST_FIRST} if shape is not None else {}
    )

    def decided(mode: Mode, reason: str) -> Decision:
        return Decision(requested, mode, reason, estimates, gpu_total_bytes)

    if requested != "auto":
        mode = cast(Mode, requested)
        if gpu_total_bytes and mode in estimates and not fits(estimates[mode].peak, gpu_total_bytes):
            return decided(mode, f"set in the job (estimated peak {_gib(estimates[mode].peak)} may not fit)")
        return decided(mode, "set in the job")
    if kept is not None:
        if kept not in MODES_FASTEST_FIRST:
            raise ValueError(f"checkpoint records an unknown gradient checkpointing mode {kept!r}")
        note = ""
        if gpu_total_bytes and kept in estimates and not fits(estimates[kept].peak, gpu_total_bytes):
            note = f"; its estimated peak {_gib(estimates[kept].peak)} may not fit this GPU"
        return decided(kept, f"kept from the checkpoint being resumed{note}")
    if gpu_total_bytes is None:
        return decided("false", "no GPU: no GPU memory to fit, no recompute")
    if shape is None:
        return decided(LOWEST_MEMORY, "model shape unknown: the lowest-memory mode")
    budget = f"{_gib(gpu_total_bytes)} GPU"
    for mode in MODES_FASTEST_FIRST:
        if fits(estimates[mode].peak, gpu_total_bytes):
            return decided(mode, f"fastest that fits: estimated peak {_gib(estimates[mode].peak)} of {budget}")
    return decided(
        LOWEST_MEMORY, f"nothing fits with headroom (lowest estimate {_gib(estimates[LOWEST_MEMORY].peak)} of {budget})"
    )


def recorded_mode(fingerprint: Mapping[str, Any]) -> str:
    """The mode a fingerprint records (checkpoints from before the field: Unsloth's)."""
    return str(fingerprint.get(FINGERPRINT_KEY, LEGACY_MODE))


def kept_mode(saved: Iterable[Mapping[str, Any]], current: Mapping[str, Any]) -> str | None:
    """The mode of the first saved fingerprint equal to `current` on every other key; None if none is.

    `saved` in the order a resume would try them (newest first). `current` is the run's
    fingerprint without the mode.
    """
    from .fingerprint import same_run  # fingerprint imports this module

    for fingerprint in saved:
        mode = recorded_mode(fingerprint)
        # Compared as a resume compares them (keys an older fingerprint lacks left out), modes aside.
        if same_run(fingerprint, {**current, FINGERPRINT_KEY: mode}):
            return mode
    return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"
