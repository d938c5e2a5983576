"""The operator's command line: settings reach the handlers through kopf's memo, not the environment."""

from __future__ import annotations

import logging

import pytest

from loraresume_operator import cli


@pytest.mark.parametrize(
    ("env", "argv", "want"),
    [(None, [], 10.0), ("2.5", [], 2.5), ("2.5", ["--interval", "4"], 4.0)],
    ids=["default", "chart-env", "flag-wins"],
)
def test_the_reconcile_interval(monkeypatch: pytest.MonkeyPatch, env: str | None, argv: list[str], want: float) -> None:
    if env is None:
        monkeypatch.delenv("LORARESUME_RECONCILE_INTERVAL", raising=False)
    else:
        monkeypatch.setenv("LORARESUME_RECONCILE_INTERVAL", env)
    assert cli._parser().parse_args(argv).interval == want


def test_a_non_positive_interval_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--interval", "0", "--metrics-port", "0"]) == 2
    assert "--interval must be positive" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("level", "kopf_objects", "own"),
    [
        ("INFO", logging.WARNING, logging.INFO),
        ("DEBUG", logging.DEBUG, logging.DEBUG),
        ("ERROR", logging.ERROR, logging.ERROR),
    ],
)
def test_kopfs_per_object_info_lines_only_at_debug(level: str, kopf_objects: int, own: int) -> None:
    """kopf's "Handler ... succeeded." per handled event is off unless debugging; its warnings and
    errors, and the operator's own INFO lines, stay."""
    root, objects = logging.getLogger(), logging.getLogger(cli.KOPF_OBJECTS)
    saved = root.level, objects.level, [(n, logging.getLogger(n).level) for n in cli.QUIET_LIBRARIES]
    try:
        root.setLevel(level)  # basicConfig leaves a root with handlers (pytest's) alone: as a fresh process has it
        cli.configure_logging(level)
        assert objects.getEffectiveLevel() == kopf_objects
        assert logging.getLogger("loraresume_operator.reconcile").getEffectiveLevel() == own
        assert objects.isEnabledFor(logging.ERROR)
    finally:
        root.setLevel(saved[0])
        objects.setLevel(saved[1])
        for name, lvl in saved[2]:
            logging.getLogger(name).setLevel(lvl)
