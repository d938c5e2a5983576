"""Rows to training texts: load a file or a `datasets` name, apply the template, check columns."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DatasetSettings
from .errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n{output}"

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# `datasets` builder names per file format.
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


def file_format(settings: DatasetSettings, path: Path) -> str:
    if settings.format:
        return settings.format
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of {path.name}: set dataset.format to one of jsonl, json, parquet, csv",
            field="dataset.format",
        )
    return fmt


def load_rows(settings: DatasetSettings, local_file: Path | None, cache_dir: Path) -> Dataset:
    """Load the split. `local_file` is the (downloaded) source file, or None for a `datasets` name."""
    import datasets

    try:
        if local_file is not None:
            if not local_file.is_file():
                raise ConfigError(f"dataset file not found: {settings.source}", field="dataset.source")
            builder = _BUILDERS[file_format(settings, local_file)]
            return datasets.load_dataset(
                builder, data_files={"train": str(local_file)}, split="train", cache_dir=str(cache_dir)
            )
        return datasets.load_dataset(settings.name, split=settings.split, cache_dir=str(cache_dir))
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        where = "dataset.source" if local_file is not None else "dataset.name"
        raise ConfigError(f"cannot load dataset: {str(exc).splitlines()[0]}", field=where) from None


def _require(columns: list[str], needed: list[str], template: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ConfigError(
            f"template {template!r} needs column(s) {', '.join(missing)}; the dataset has: {', '.join(columns)}",
            field="dataset.template",
        )


def _alpaca(row: dict[str, Any]) -> str:
    if row.get("input"):
        return ALPACA_WITH_INPUT.format(instruction=row["instruction"], input=row["input"], output=row["output"])
    return ALPACA_NO_INPUT.format(instruction=row["instruction"], output=row["output"])


def to_texts(rows: Dataset, settings: DatasetSettings, tokenizer: Any) -> Dataset:
    """A dataset with one `text` column, in the source's row order. Raises ConfigError."""
    columns = list(rows.column_names)
    template = settings.template
    if template == "alpaca":
        _require(columns, ["instruction", "output"], template)
        render = _alpaca
    elif template == "chat":
        _require(columns, [settings.messages_column], template)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the base model's tokenizer has no chat template; use `alpaca` or a format string",
                field="dataset.template",
            )
        column = settings.messages_column

        def render(row: dict[str, Any]) -> str:
            return tokenizer.apply_chat_template(row[column], tokenize=False)
    else:
        _require(columns, list(settings.custom_fields), template)

        def render(row: dict[str, Any]) -> str:
            return template.format(**{f: row[f] for f in settings.custom_fields})

    if len(rows) == 0:
        raise ConfigError("the dataset has no rows", field="dataset.source" if settings.source else "dataset.name")
    try:
        return rows.map(lambda row: {"text": render(row)}, remove_columns=columns, load_from_cache_file=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot apply template {template!r}: {exc}", field="dataset.template") from None
