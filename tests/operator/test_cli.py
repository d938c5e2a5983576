"""The operator's command line: settings reach the handlers through kopf's memo, not the environment."""

from __future__ import annotations

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
