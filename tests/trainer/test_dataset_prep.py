"""Rows to texts: every file format, every template kind, and errors that name the columns."""

from __future__ import annotations

import json

import pytest

from loraresume_trainer.config import DatasetSettings
from loraresume_trainer.dataset_prep import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, load_rows, to_texts
from loraresume_trainer.errors import ConfigError

ROWS = [
    {"instruction": "Add 1 and 2.", "input": "", "output": "3"},
    {"instruction": "Name a colour.", "input": "warm", "output": "red"},
]


def write(tmp_path, fmt):
    import pandas as pd

    path = tmp_path / f"rows.{fmt}"
    frame = pd.DataFrame(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_gives_the_same_alpaca_texts(fmt, tmp_path, tokenizer):
    settings = DatasetSettings(source=str(write(tmp_path, fmt)))
    texts = to_texts(load_rows(settings, write(tmp_path, fmt), tmp_path / "cache"), settings, tokenizer)
    assert texts["text"] == [
        ALPACA_NO_INPUT.format(**ROWS[0]),
        ALPACA_WITH_INPUT.format(**ROWS[1]),
    ]


def test_format_is_taken_from_the_setting_when_the_extension_says_nothing(tmp_path, tokenizer):
    path = tmp_path / "rows.data"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.raises(ConfigError) as info:
        load_rows(DatasetSettings(source=str(path)), path, tmp_path / "cache")
    assert info.value.field == "dataset.format"
    settings = DatasetSettings(source=str(path), format="jsonl")
    assert len(load_rows(settings, path, tmp_path / "cache")) == 2


def test_custom_format_string(tmp_path, tokenizer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "answer": "Because.", "extra": 1}) + "\n")
    settings = DatasetSettings(source=str(path), template="Q: {question}\nA: {answer}")
    texts = to_texts(load_rows(settings, path, tmp_path / "cache"), settings, tokenizer)
    assert texts["text"] == ["Q: Why?\nA: Because."]
    assert texts.column_names == ["text"]


def test_chat_template_over_messages(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    settings = DatasetSettings(source=str(path), template="chat")
    texts = to_texts(load_rows(settings, path, tmp_path / "cache"), settings, tokenizer)
    assert texts["text"] == [tokenizer.apply_chat_template(messages, tokenize=False)]
    assert "<|assistant|>\nhello" in texts["text"][0]


@pytest.mark.parametrize(
    ("template", "rows", "missing"),
    [
        ("alpaca", [{"prompt": "p", "completion": "c"}], "instruction, output"),
        ("chat", [{"prompt": "p"}], "messages"),
        ("{question} -> {answer}", [{"question": "q"}], "answer"),
    ],
    ids=["alpaca", "chat", "custom"],
)
def test_missing_columns_are_named_with_the_ones_that_exist(template, rows, missing, tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = DatasetSettings(source=str(path), template=template)
    with pytest.raises(ConfigError) as info:
        to_texts(load_rows(settings, path, tmp_path / "cache"), settings, tokenizer)
    assert info.value.field == "dataset.template"
    assert f"needs column(s) {missing}" in str(info.value)
    assert "the dataset has: " + ", ".join(rows[0]) in str(info.value)


def test_chat_template_needs_a_tokenizer_template(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    settings = DatasetSettings(source=str(path), template="chat")
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        to_texts(load_rows(settings, path, tmp_path / "cache"), settings, bare)


def test_missing_file_names_the_source(tmp_path):
    settings = DatasetSettings(source=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError) as info:
        load_rows(settings, tmp_path / "nope.jsonl", tmp_path / "cache")
    assert info.value.field == "dataset.source"
