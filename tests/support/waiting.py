"""Polling helpers for tests: the sandbox's own (one copy of the code)."""

from loraresume_sandbox.waiting import free_port, wait_for

__all__ = ["free_port", "wait_for"]
