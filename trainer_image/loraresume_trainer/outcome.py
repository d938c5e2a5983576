"""How a trainer process ends: exit code plus a Kubernetes termination message.

The operator tells preemption from failure by these (DESIGN.md, "Preemption versus
failure"). Codes follow sysexits where one fits.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path

log = logging.getLogger(__name__)

# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_MESSAGE_BYTES = 4096


class Outcome(enum.Enum):
    """Exit classes; `code` is the process exit status."""

    SUCCEEDED = 0  # adapter + manifest durable in S3
    FAILED = 1  # unexpected error, S3 unreachable, crash: retry with backoff
    PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM handled, newest checkpoint durable: relaunch at once
    CONFIG_ERROR = 78  # EX_CONFIG: the job cannot run as written: do not retry

    @property
    def code(self) -> int:
        return self.value


@dataclass
class TerminationMessage:
    """The JSON the operator reads from the container's terminated state."""

    outcome: str
    reason: str
    exit_code: int
    durable_step: int | None = None
    checkpoint: str | None = None
    adapter: str | None = None
    step: int | None = None
    # False: stopped before its first training step (a SIGTERM while loading), so this attempt wrote no
    # checkpoint and lost no step: what the job has durable is what it had when the attempt started
    trained: bool | None = None
    field: str | None = None
    time: float = dc_field(default_factory=time.time)

    def to_json(self) -> str:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        reason = body["reason"]
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        while len(text.encode()) > MAX_MESSAGE_BYTES and reason:
            overflow = len(text.encode()) - MAX_MESSAGE_BYTES
            reason = reason[: max(0, len(reason) - max(overflow, 16))]
            body["reason"] = reason + " …(truncated)"
            text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        return text


def write_termination_message(path: Path, message: TerminationMessage) -> None:
    """Best effort: a missing /dev/termination-log (outside Kubernetes) must not mask the outcome."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message.to_json())
    except OSError as exc:
        log.warning("could not write termination message to %s: %s", path, exc.strerror)
