"""Generated docs must match the model they describe."""

from pathlib import Path

from loraresume_trainer.config_docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "job-config.md"


def test_job_config_doc_is_generated_from_the_model():
    assert DOC.read_text() == render(), "docs/job-config.md is stale: run `make docs`"
