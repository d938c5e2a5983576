"""Base model and LoRA adapter through Unsloth's API, with the adapter checked against the base.

Loading the adapter directory with `FastLanguageModel.from_pretrained` (not the seed's
PeftModel path) keeps Unsloth's LoRA patching and loads the adapter trainable.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .config import JobConfig
from .errors import ConfigError
from .grad_checkpointing import Mode, to_unsloth

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(adapter_dir: Path, adapter_ref: str) -> dict[str, Any]:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{adapter_ref} is not a LoRA adapter: it has no {ADAPTER_CONFIG}", field="adapter") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{adapter_ref}: {ADAPTER_CONFIG} is not valid JSON ({exc})", field="adapter") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{adapter_ref}: {ADAPTER_CONFIG} is not a JSON object", field="adapter")
    return config


def lora_shape(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The LoRA shape as recorded in fingerprints, from a PEFT adapter_config.json."""
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return {
        "r": int(adapter_config.get("r", 0)),
        "alpha": int(adapter_config.get("lora_alpha", 0)),
        "dropout": float(adapter_config.get("lora_dropout", 0.0)),
        "target_modules": sorted(targets),
        "bias": adapter_config.get("bias", "none"),
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
    }


def job_lora_shape(job: JobConfig) -> dict[str, Any]:
    lora = job.lora
    return {
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "bias": lora.bias,
        "use_rslora": lora.use_rslora,
    }


def adapter_misfits(adapter_shapes: dict[str, tuple[int, ...]], base_linears: dict[str, tuple[int, int]]) -> list[str]:
    """Pure check: LoRA tensor shapes against the base model's (in_features, out_features).

    `adapter_shapes` maps PEFT state-dict keys (``…q_proj.lora_A.weight``) to shapes.
    """
    problems = []
    for key, shape in sorted(adapter_shapes.items()):
        for part, expect_axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            module = key.split(part)[0].removeprefix("base_model.model.")
            if module not in base_linears:
                problems.append(f"module {module} does not exist in the base model")
                break
            in_f, out_f = base_linears[module]
            want = in_f if expect_axis == 1 else out_f
            if len(shape) != 2 or shape[expect_axis] != want:
                problems.append(
                    f"{module}{part.rstrip('.')} has shape {list(shape)}, the base needs {want} on axis {expect_axis}"
                )
    return problems


def check_adapter_fits(adapter_dir: Path, base_path: str, *, adapter_ref: str, base_ref: str) -> None:
    """Compare the adapter's LoRA tensors with the base's linear layers (meta device: no weights loaded)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{adapter_ref} has no {ADAPTER_WEIGHTS}", field="adapter")
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)
    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = {
        name: (m.in_features, m.out_features)
        for name, m in skeleton.named_modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features")
    }
    problems = adapter_misfits(shapes, linears)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(f"adapter {adapter_ref} does not fit base model {base_ref}: {shown}", field="adapter")


def stage_adapter(src: Path, dest: Path, base_path: str) -> Path:
    """Copy the adapter and point its config at the base being used here.

    An adapter records the base path it was trained from (often another pod's cache
    path); Unsloth loads that base first, so it must name ours.
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    config_path = dest / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_path
    config["inference_mode"] = False
    config_path.write_text(json.dumps(config, indent=2))
    return dest


def torch_dtype(name: str, on_gpu: bool) -> Any:
    import torch

    if name == "auto":
        return None if on_gpu else torch.float32  # fp32 on CPU: exact and supported everywhere
    return getattr(torch, name)


def count_trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_model(
    job: JobConfig,
    base_path: str,
    adapter_dir: Path | None,
    *,
    on_gpu: bool,
    gradient_checkpointing: Mode = "unsloth",
) -> tuple[Any, Any]:
    """Returns (PEFT model, tokenizer). Raises ConfigError when nothing would train.

    `gradient_checkpointing`: the run's mode (grad_checkpointing.choose), as Unsloth spells it.
    """
    import transformers
    from unsloth import FastLanguageModel

    common = dict(
        max_seq_length=job.max_seq_length,
        load_in_4bit=job.load_in_4bit,
        dtype=torch_dtype(job.dtype, on_gpu),
        use_gradient_checkpointing=to_unsloth(gradient_checkpointing),
        random_state=job.seed,
    )
    # The LoRA is initialised before the Trainer seeds the RNG: seed here so fresh runs agree.
    transformers.set_seed(job.seed)
    if adapter_dir is not None:
        model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(adapter_dir), **common)
    else:
        model, tokenizer = FastLanguageModel.from_pretrained(model_name=base_path, **common)
        lora = job.lora
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias=lora.bias,
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing=to_unsloth(gradient_checkpointing),
            random_state=job.seed,
        )
    trainable = count_trainable(model)
    if trainable == 0:
        raise ConfigError("the model has 0 trainable parameters; the adapter was loaded frozen", field="adapter")
    log.info("model ready: %s trainable parameters", f"{trainable:,}")
    return model, tokenizer
