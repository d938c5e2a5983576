"""Secrets must never reach logs, events, status or termination messages.

Credentials come from the environment (a Secret via secretKeyRef); any text leaving the
process is scrubbed of their values, whatever library produced it.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import sys

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Userinfo runs to the last "@" before the path: passwords may contain "@", users may be empty.
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")


_KNOWN: set[str] = set()  # secret values read at run time (the operator reads Secrets through the API)


def remember_secret(value: str) -> None:
    """Scrub this value (and its base64 form, as API responses carry it) from everything logged."""
    if value and len(value) >= 4:
        _KNOWN.add(value)
        _KNOWN.add(base64.b64encode(value.encode()).decode())


def redact(text: str) -> str:
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    for value in tuple(_KNOWN):
        text = text.replace(value, "***")
    return _USERINFO.sub("***@", text)


class _RedactingFilter(logging.Filter):
    """Scrubs the message and any traceback: libraries log exceptions (with exc_info) whose text
    can carry an endpoint URL with credentials."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None  # handlers then print exc_text, which is scrubbed below
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def configure_logging() -> None:
    """The trainer's logging, for each of its processes (the trainer, its upload process): level from
    $LORARESUME_LOG_LEVEL (INFO), one format, on stderr, every record scrubbed."""
    logging.basicConfig(
        level=os.environ.get("LORARESUME_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    install_log_redaction()


def install_log_redaction() -> None:
    """Scrub every record handled by the root logger's handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter())
