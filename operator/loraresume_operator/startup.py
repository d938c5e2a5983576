"""A restart's start-up, as the trainer reported it, for status.lastStartup and the start-up metric (pure).

The trainer writes `startup` into progress.json: each phase it has reached, as seconds from its
process's start (loraresume_trainer.progress.STARTUP_PHASES, in order). progress.json is the
trainer's, so it is read as untrusted: unknown phases, non-numbers and times that run backwards
are dropped, never raised on.
"""

from __future__ import annotations

import math
from typing import Any

from loraresume_trainer.progress import STARTUP_PHASES

from .spec import LastStartup, StartupPhase

WHOLE = "first_step"  # the phase whose end is the whole start-up: the first step done


def last_startup(progress: dict[str, Any]) -> LastStartup | None:
    """The start-up of the attempt progress.json belongs to, or None when it reports none."""
    raw = progress.get("startup")
    attempt = progress.get("attempt")
    if not isinstance(raw, dict) or not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
        return None
    phases: list[StartupPhase] = []
    previous = 0.0
    for name in STARTUP_PHASES:
        at = raw.get(name)
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < previous:
            continue
        phases.append(StartupPhase(phase=name, at_seconds=round(at, 3), took_seconds=round(at - previous, 3)))
        previous = at
    if not phases:
        return None
    return LastStartup(attempt=attempt, seconds=phases[-1].at_seconds, phases=phases)


def completed(startup: LastStartup | None) -> bool:
    return startup is not None and any(p.phase == WHOLE for p in startup.phases)


def to_observe(before: LastStartup | None, after: LastStartup | None) -> list[tuple[str, float]]:
    """(phase, seconds) for the start-up metric, once per attempt: when `after` is a start-up that has
    reached its first step and `before` (the status's) was not that same completed one. The whole
    start-up is observed as phase `total`."""
    if after is None or not completed(after):
        return []
    if before is not None and before.attempt == after.attempt and completed(before):
        return []
    return [(p.phase, p.took_seconds) for p in after.phases] + [("total", after.seconds)]
