"""Tiny offline models and datasets for tests: the sandbox's own builders (one copy of the code)."""

from loraresume_sandbox.seed_data import CHAT_TEMPLATE, alpaca_rows, build_tiny_llama, write_jsonl

__all__ = ["CHAT_TEMPLATE", "alpaca_rows", "build_tiny_llama", "write_jsonl"]
