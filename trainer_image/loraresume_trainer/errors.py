"""Typed errors: each says whether a relaunch can help, which decides the exit code."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class. ``permanent`` errors end the job; others are worth a relaunch."""

    permanent = False


class ConfigError(TrainerError):
    """The job as written cannot run (bad field, missing column, adapter for another base).

    ``field`` names the offending job-config field (dotted path) when there is one.
    """

    permanent = True

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class StorageError(TrainerError):
    """S3 could not be reached or answered with a server error: retry later."""


class StorageAuthError(ConfigError):
    """S3 refused the credentials or the bucket does not exist: a relaunch will not fix it."""


class DamagedCheckpoint(TrainerError):
    """A checkpoint in S3 fails verification (missing file, wrong size or hash, bad manifest)."""


class ResumeRefused(ConfigError):
    """The job changed in a way that makes an exact resume impossible."""


class Preempted(TrainerError):
    """SIGTERM arrived; raised where training cannot stop at an optimizer-step boundary."""


def describe(exc: BaseException) -> str:
    """Error class and, for our own and OS errors (known to hold no secrets), the message."""
    if isinstance(exc, (TrainerError, OSError)):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
