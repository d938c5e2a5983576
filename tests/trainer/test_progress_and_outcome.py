"""Progress metrics and events, exit outcomes and termination messages, secret redaction."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loraresume_trainer.outcome import (
    MAX_MESSAGE_BYTES,
    Outcome,
    TerminationMessage,
    write_termination_message,
)
from loraresume_trainer.progress import emit_event, mean_train_loss, progress_record, tokens_before
from loraresume_trainer.redact import SECRET_ENV_VARS, install_log_redaction, redact

# --- mean_train_loss -----------------------------------------------------------------------

LOSS_HISTORIES = [
    # (log_history, logging_steps, expected per-step mean)
    pytest.param([], 1, None, id="empty"),
    pytest.param([{"eval_loss": 1.0, "step": 5}, {"train_loss": 9.0, "step": 5}], 1, None, id="no-loss-entries"),
    pytest.param([{"loss": 2.0, "step": 1}, {"loss": 4.0, "step": 2}], 1, 3.0, id="every-step"),
    pytest.param(
        [{"loss": 2.0, "step": 5}, {"loss": 4.0, "step": 10}, {"loss": 1.0, "step": 15}],
        5,
        (2.0 * 5 + 4.0 * 5 + 1.0 * 5) / 15,
        id="logging_steps-5-equal-intervals",
    ),
    pytest.param(
        [{"loss": 10.0, "step": 1}, {"loss": 2.0, "step": 5}],
        5,
        (10.0 * 1 + 2.0 * 4) / 5,
        id="logging-first-step-weights-gaps",
    ),
    pytest.param(
        [{"loss": 3.0, "step": 4}, {"loss": 6.0, "step": 8}, {"loss": 0.0, "step": 10}],
        4,
        (3.0 * 4 + 6.0 * 4 + 0.0 * 2) / 10,
        id="short-last-interval",
    ),
    pytest.param(
        [
            # restored from checkpoint-4's trainer_state.json
            {"loss": 4.0, "step": 2, "learning_rate": 1e-4},
            {"loss": 2.0, "step": 4, "learning_rate": 1e-4},
            # this attempt, after the resume
            {"loss": 1.0, "step": 6, "num_tokens": 10.0},
            {"eval_loss": 99.0, "step": 6},
            {"loss": 1.0, "step": 8},
            {"train_loss": 123.0, "train_runtime": 1.0, "step": 8},
        ],
        2,
        (4.0 * 2 + 2.0 * 2 + 1.0 * 2 + 1.0 * 2) / 8,
        id="after-resume-history-from-before",
    ),
    pytest.param(
        [{"loss": 2.0, "step": 4}, {"loss": 4.0, "step": 4}],
        2,
        (2.0 * 4 + 4.0 * 2) / 6,
        id="repeated-step-counts-logging_steps",
    ),
    pytest.param([{"loss": 5.0}, {"step": 3}], 1, None, id="entries-without-step-or-loss-ignored"),
]


@pytest.mark.parametrize(("history", "logging_steps", "expected"), LOSS_HISTORIES)
def test_mean_train_loss(history: list[dict[str, Any]], logging_steps: int, expected: float | None) -> None:
    got = mean_train_loss(history, logging_steps)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)


# --- tokens_before -------------------------------------------------------------------------

TOKEN_HISTORY = [
    {"loss": 1.0, "step": 1, "num_tokens": 100.0},
    {"loss": 1.0, "step": 2},
    {"loss": 1.0, "step": 3, "num_tokens": 350.0},
    {"eval_loss": 1.0, "step": 3},
    {"loss": 1.0, "step": 5, "num_tokens": 600.0},
]


@pytest.mark.parametrize(
    ("history", "step", "expected"),
    [
        pytest.param([], 10, 0.0, id="empty"),
        pytest.param(TOKEN_HISTORY, 0, 0.0, id="before-first-log"),
        pytest.param(TOKEN_HISTORY, 1, 100.0, id="at-a-logged-step"),
        pytest.param(TOKEN_HISTORY, 2, 100.0, id="between-logs"),
        pytest.param(TOKEN_HISTORY, 4, 350.0, id="skips-entries-without-tokens"),
        pytest.param(TOKEN_HISTORY, 5, 600.0, id="last"),
        pytest.param(TOKEN_HISTORY, 100, 600.0, id="after-last"),
    ],
)
def test_tokens_before(history: list[dict[str, Any]], step: int, expected: float) -> None:
    assert tokens_before(history, step) == expected


# --- progress_record -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("logs", "expected"),
    [
        pytest.param(
            {"loss": 1.5, "learning_rate": 2e-4, "grad_norm": 0.3, "epoch": 0.5, "num_tokens": 1000},
            {"loss": 1.5, "learning_rate": 2e-4, "grad_norm": 0.3, "epoch": 0.5, "num_tokens": 1000.0},
            id="finite-values-kept",
        ),
        pytest.param(
            {"loss": float("nan"), "learning_rate": float("inf"), "grad_norm": float("-inf"), "epoch": 1},
            {"loss": None, "learning_rate": None, "grad_norm": None, "epoch": 1.0, "num_tokens": None},
            id="nan-and-inf-dropped",
        ),
        pytest.param(
            {},
            {"loss": None, "learning_rate": None, "grad_norm": None, "epoch": None, "num_tokens": None},
            id="missing",
        ),
        pytest.param(
            {"loss": "0.25", "grad_norm": None}, {"loss": 0.25, "grad_norm": None}, id="string-number-and-none"
        ),
    ],
)
def test_progress_record(logs: dict[str, Any], expected: dict[str, Any]) -> None:
    before = time.time()
    record = progress_record(step=7, max_steps=60, logs=logs, attempt=2, durable_step=5, phase="Running")
    after = time.time()

    for key, value in expected.items():
        assert record[key] == value, key
    assert (record["step"], record["max_steps"], record["attempt"]) == (7, 60, 2)
    assert (record["durable_step"], record["phase"]) == (5, "Running")
    assert before <= record["time"] <= after
    json.dumps(record, allow_nan=False)  # strict JSON: the operator reads it


# --- emit_event ----------------------------------------------------------------------------


def test_emit_event_writes_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    emit_event("log", step=3, loss=0.5, checkpoint=None, where=Path("/tmp/x"), tags=["a"])

    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith("\n") and out.count("\n") == 1
    event = json.loads(out)
    assert event == {"event": "log", "step": 3, "loss": 0.5, "where": "/tmp/x", "tags": ["a"]}
    assert next(iter(event)) == "event"


def test_emit_event_lines_are_separate(capsys: pytest.CaptureFixture[str]) -> None:
    emit_event("start", mode="fresh")
    emit_event("done", reason="multi\nline")

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "done"]
    assert json.loads(lines[1])["reason"] == "multi\nline"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_emit_event_stays_strict_json_for_non_finite_numbers(capsys: pytest.CaptureFixture[str], value: float) -> None:
    emit_event("log", step=1, loss=value)
    json.loads(capsys.readouterr().out, parse_constant=_reject_constant)


# --- Outcome / TerminationMessage ----------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        pytest.param(Outcome.SUCCEEDED, 0, id="succeeded"),
        pytest.param(Outcome.FAILED, 1, id="failed"),
        pytest.param(Outcome.PREEMPTED, 75, id="preempted-EX_TEMPFAIL"),
        pytest.param(Outcome.CONFIG_ERROR, 78, id="config-error-EX_CONFIG"),
    ],
)
def test_outcome_codes(outcome: Outcome, code: int) -> None:
    assert outcome.code == code


def message(reason: str, **fields: Any) -> TerminationMessage:
    return TerminationMessage(
        outcome="failed",
        reason=reason,
        exit_code=1,
        durable_step=40,
        checkpoint="s3://bkt/job/checkpoints/checkpoint-40/",
        field="storage.uri",
        time=1700000000.5,
        **fields,
    )


def test_to_json_small_message_is_compact_and_drops_none() -> None:
    text = message("boom").to_json()
    assert text == (
        '{"outcome":"failed","reason":"boom","exit_code":1,"durable_step":40,'
        '"checkpoint":"s3://bkt/job/checkpoints/checkpoint-40/","field":"storage.uri","time":1700000000.5}'
    )


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("x" * 100_000, id="ascii"),
        pytest.param("é" * 10_000, id="non-ascii-escaped"),
        pytest.param('"\\\n' * 5_000, id="escaped-characters"),
        pytest.param("y" * 4_500, id="just-over"),
    ],
)
def test_to_json_huge_reason_fits_and_keeps_other_fields(reason: str) -> None:
    text = message(reason).to_json()

    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    body = json.loads(text)
    assert body["reason"].endswith(" …(truncated)")
    assert reason.startswith(body["reason"].removesuffix(" …(truncated)"))
    assert {k: v for k, v in body.items() if k != "reason"} == {
        "outcome": "failed",
        "exit_code": 1,
        "durable_step": 40,
        "checkpoint": "s3://bkt/job/checkpoints/checkpoint-40/",
        "field": "storage.uri",
        "time": 1700000000.5,
    }


def test_to_json_keeps_as_much_ascii_reason_as_fits() -> None:
    body = json.loads(message("x" * 100_000).to_json())
    assert len(body["reason"]) > MAX_MESSAGE_BYTES - 200


@pytest.mark.parametrize(("extra", "truncated"), [(0, False), (1, True)], ids=["exactly-at-limit", "one-byte-over"])
def test_to_json_limit_boundary(extra: int, truncated: bool) -> None:
    overhead = len(message("").to_json().encode())
    reason = "z" * (MAX_MESSAGE_BYTES - overhead + extra)
    text = message(reason).to_json()
    assert len(text.encode()) <= MAX_MESSAGE_BYTES
    assert (json.loads(text)["reason"] != reason) is truncated


def test_write_termination_message_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "dev" / "termination-log"
    write_termination_message(path, message("done"))
    assert json.loads(path.read_text())["reason"] == "done"


def _file(path: Path) -> Path:
    path.write_text("")
    return path


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda d: d, id="path-is-a-directory"),
        pytest.param(lambda d: _file(d / "file") / "termination-log", id="parent-is-a-file"),
    ],
)
def test_write_termination_message_unwritable_does_not_raise(
    tmp_path: Path, make_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_path(tmp_path)
    with caplog.at_level(logging.WARNING, logger="loraresume_trainer.outcome"):
        write_termination_message(path, message("done"))
    assert f"could not write termination message to {path}" in caplog.text


# --- redact --------------------------------------------------------------------------------


@pytest.fixture
def clean_secrets(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


REDACTIONS = [
    # (environment, text, expected)
    pytest.param({}, "plain text, nothing secret", "plain text, nothing secret", id="nothing-to-redact"),
    pytest.param(
        {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG"},
        "signing with wJalrXUtnFEMI/K7MDENG twice wJalrXUtnFEMI/K7MDENG",
        "signing with *** twice ***",
        id="secret-access-key",
    ),
    pytest.param({"AWS_SESSION_TOKEN": "FwoGZXIvYXdzEJr"}, "token=FwoGZXIvYXdzEJr;", "token=***;", id="session-token"),
    pytest.param({"AWS_SECURITY_TOKEN": "legacy-token"}, "x legacy-token y", "x *** y", id="security-token"),
    pytest.param({"AWS_SECRET_ACCESS_KEY": "abc"}, "abc abc", "abc abc", id="too-short-to-redact"),
    pytest.param(
        {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "key AKIAEXAMPLE", "key AKIAEXAMPLE", id="access-key-id-not-secret"
    ),
    pytest.param(
        {},
        "endpoint https://minio:pa55w0rd@minio.local:9000/bucket failed",
        "endpoint https://***@minio.local:9000/bucket failed",
        id="url-userinfo",
    ),
    pytest.param({}, "http://user@host/x", "http://***@host/x", id="url-user-only-redacted-too"),
    pytest.param(
        {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"},
        "https://AKIA:s3cr3t-value@host/ and s3cr3t-value",
        "https://***@host/ and ***",
        id="secret-inside-url",
    ),
]


@pytest.mark.parametrize(("env", "text", "expected"), REDACTIONS)
def test_redact(clean_secrets: pytest.MonkeyPatch, env: dict[str, str], text: str, expected: str) -> None:
    for name, value in env.items():
        clean_secrets.setenv(name, value)
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("https://user:p@ss@minio:9000/b", "https://***@minio:9000/b", id="at-sign-in-password"),
        pytest.param("https://:t0ken@minio:9000/b", "https://***@minio:9000/b", id="empty-user"),
    ],
)
def test_redact_userinfo_edge_cases(clean_secrets: pytest.MonkeyPatch, text: str, expected: str) -> None:
    assert redact(text) == expected


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.stream = io.StringIO()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.stream.write(self.format(record) + "\n")


LOGGER = "loraresume_trainer.test_redact"


@pytest.fixture
def root_capture(clean_secrets: pytest.MonkeyPatch) -> Iterator[_Records]:
    """The root logger with only our handler (restored afterwards), redaction installed on it."""
    handler = _Records()
    clean_secrets.setattr(logging.getLogger(), "handlers", [handler])
    clean_secrets.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-key-123")
    install_log_redaction()
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize(
    ("msg", "args", "expected"),
    [
        pytest.param("key is super-secret-key-123", (), "key is ***", id="in-message"),
        pytest.param("key is %s", ("super-secret-key-123",), "key is ***", id="in-args"),
        pytest.param(
            "endpoint %s", ("http://u:pw12@minio:9000",), "endpoint http://***@minio:9000", id="userinfo-in-args"
        ),
    ],
)
def test_log_filter_scrubs_records(root_capture: _Records, msg: str, args: tuple[Any, ...], expected: str) -> None:
    logging.getLogger(LOGGER).warning(msg, *args)

    assert root_capture.stream.getvalue() == expected + "\n"
    assert "super-secret-key-123" not in root_capture.records[0].getMessage()


def test_log_filter_leaves_clean_records_untouched(root_capture: _Records) -> None:
    logging.getLogger(LOGGER).info("step %d of %d", 3, 10)

    record = root_capture.records[0]
    assert (record.msg, record.args) == ("step %d of %d", (3, 10))
    assert root_capture.stream.getvalue() == "step 3 of 10\n"
