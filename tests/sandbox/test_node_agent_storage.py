"""The node agent's emptyDir usage walk runs while the trainer renames and removes files under it: what
vanishes meanwhile is skipped (a FileNotFoundError there ended the storage loop for every pod)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraresume_sandbox import node_agent


def test_the_usage_walk_skips_what_vanishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "output" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "output" / "checkpoint-5" / "a").write_bytes(b"x" * 10)
    (tmp_path / "output" / "b").write_bytes(b"x" * 5)
    assert node_agent._tree_bytes(tmp_path) == 15
    assert node_agent._tree_bytes(tmp_path / "gone") == 0
    real_stat = os.stat

    def racing_stat(path: str, *args: object, **kw: object) -> os.stat_result:
        if str(path).endswith("/a"):  # moved away between the listing and the stat
            raise FileNotFoundError(path)
        return real_stat(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(node_agent.os, "stat", racing_stat)
    assert node_agent._tree_bytes(tmp_path) == 5
