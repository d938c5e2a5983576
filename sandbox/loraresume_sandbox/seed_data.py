"""Seed data for the sandbox: a tiny random-init Llama model (with a BPE tokenizer trained on the
fly) and a small alpaca-style instruction dataset, built offline in a few seconds on a CPU.

A development helper only: nothing here is used by the trainer or the operator.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def alpaca_rows(n: int, *, offset: int = 0, with_input_every: int = 3) -> list[dict[str, str]]:
    """`n` instruction/input/output rows that a tiny model can learn something from."""
    return [
        {
            "instruction": f"Square the number {i}.",
            "input": f"{i}" if i % with_input_every == 0 else "",
            "output": f"The square of {i} is {i * i}.",
        }
        for i in range(offset, offset + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_llama(out: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-init Llama-architecture causal LM and a BPE tokenizer to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n{r['output']}"
        for r in alpaca_rows(300)
    ]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=256
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def seed_s3(s3, bucket: str, workdir: Path, *, rows: int = 64) -> dict[str, str]:
    """Upload the tiny model to s3://bucket/models/tiny/ and the dataset to s3://bucket/data/train.jsonl."""
    model_dir = workdir / "tiny"
    if not (model_dir / "config.json").exists():
        build_tiny_llama(model_dir)
    for path in sorted(model_dir.iterdir()):
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    data = write_jsonl(workdir / "train.jsonl", alpaca_rows(rows))
    s3.upload_file(str(data), bucket, "data/train.jsonl")
    return {"model": f"s3://{bucket}/models/tiny/", "dataset": f"s3://{bucket}/data/train.jsonl"}
