"""Secrets must never reach logs, events, status or termination messages.

Credentials come from the environment (a Secret via secretKeyRef); any text leaving the
process is scrubbed of their values, whatever library produced it.
"""

from __future__ import annotations

import logging
import os
import re

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Userinfo runs to the last "@" before the path: passwords may contain "@", users may be empty.
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")


def redact(text: str) -> str:
    for var in SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _USERINFO.sub("***@", text)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Scrub every record handled by the root logger's handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter())
