"""The trainer's scratch disk holds about two checkpoints, however long the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraresume_trainer.local_checkpoints import local_steps, prune_older_than
from tests.support.trainer_runs import run_attempt


@pytest.mark.parametrize(
    ("present", "durable", "removed", "kept"),
    [
        (["checkpoint-5", "checkpoint-10", "checkpoint-15"], 10, [5], [10, 15]),
        (["checkpoint-5", "checkpoint-10"], 10, [5], [10]),  # the newest durable one stays
        (["checkpoint-5"], 5, [], [5]),
        ([], 5, [], []),
        # not ours, or not a canonical checkpoint name: never touched
        (["checkpoint-05", "checkpoint-x", "runs", "checkpoint-3.tmp"], 10, [], []),
    ],
    ids=["older-go", "newest-durable-stays", "only-one", "empty", "foreign-names"],
)
def test_older_local_checkpoints_are_removed(tmp_path: Path, present, durable, removed, kept):
    for name in present:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-1").write_text("a file, not a checkpoint directory")
    assert prune_older_than(tmp_path, durable) == removed
    assert local_steps(tmp_path) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {*present, "checkpoint-1"} - {f"checkpoint-{s}" for s in removed}
    )


@pytest.mark.slow
def test_a_long_run_keeps_at_most_two_local_checkpoints(make_job):
    config, work = make_job(training={"max_steps": 40, "save_steps": 4})  # ten checkpoints
    attempt = run_attempt(config, work)
    assert attempt.exit_code == 0, attempt.stderr[-2000:]
    durable = attempt.of("checkpoint_durable")
    assert [e["step"] for e in durable] == list(range(4, 41, 4))
    # As each checkpoint becomes durable, none older than it stays on the disk (the newer ones still
    # queued for upload do: how many depends on how far the uploads lag behind the steps, which on a
    # loaded 2-core machine is several for a model this small).
    for e in durable:
        assert min(e["local_checkpoints"]) >= e["step"], e
        assert all(step < e["step"] for step in e["pruned"]), e
    assert sum(len(e["pruned"]) for e in durable) == 9  # every checkpoint but the last, each once
    assert local_steps(Path(config["workDir"]) / "output") == [40]
