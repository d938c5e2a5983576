"""A device diagnostic (benchmarks/triton_keys, never in an image): logs the parts of every Triton cache key,
one JSON line per compile, to $TKEY_DIR/<pid>.jsonl; compare.py shows which part differed between attempts.

Python imports this module at start when its directory is on PYTHONPATH (python.sh). It wraps
`triton.compiler.compiler.get_cache_key` as that module is first imported; nothing else changes."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import os
import sys
from typing import Any

LOG_DIR = os.environ.get("TKEY_DIR", "/tmp/tkey")


def _sha(value: object) -> str:
    return hashlib.sha256(str(value).encode()).hexdigest()[:16]


def _parts(src: Any, backend: Any, options: Any, env_vars: dict[str, str], key: str) -> dict[str, Any]:
    from triton.runtime.cache import triton_key

    record: dict[str, Any] = {
        "pid": os.getpid(),
        "attempt": os.environ.get("LORARESUME_ATTEMPT"),
        "name": getattr(src, "name", None),
        "full": _sha(key),
        "tkey": _sha(triton_key()),
        "backend": backend.hash(),
        "opts": options.hash(),
        "env": str(sorted(env_vars.items())),
        "attrs": _sha(getattr(src, "attrs", "")),
        "sig": _sha(getattr(src, "signature", "")),
        "consts": str(sorted((str(k), str(v)[:120]) for k, v in getattr(src, "constants", {}).items()))[:2000],
    }
    fn = getattr(src, "fn", None)
    if fn is not None and hasattr(fn, "cache_key"):
        code = getattr(getattr(fn, "fn", None), "__code__", None)
        record.update(
            fn_key=_sha(fn.cache_key),
            src=_sha(fn.src),
            line=fn.starting_line_number,
            file=getattr(code, "co_filename", None),
            gvals=str([(n, repr(v)[:160]) for (n, _), (v, _) in fn.used_global_vals.items()])[:3000],
            deps={
                n: _sha(v.cache_key)
                for n, v in getattr(fn, "__globals__", {}).items()
                if n in fn.src and hasattr(v, "cache_key") and v is not fn
            },
        )
    return record


def _wrap(module: Any) -> None:
    original = module.get_cache_key

    def get_cache_key(src: Any, backend: Any, backend_options: Any, env_vars: dict[str, str]) -> str:
        key = original(src, backend, backend_options, env_vars)
        try:
            record = _parts(src, backend, backend_options, env_vars, key)
            with open(os.path.join(LOG_DIR, f"{os.getpid()}.jsonl"), "a") as log:
                log.write(json.dumps(record) + "\n")
        except Exception as exc:  # a diagnostic never breaks the compile
            sys.stderr.write(f"triton_keys: {exc!r}\n")
        return key

    module.get_cache_key = get_cache_key


class _WrapOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "triton.compiler.compiler":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


os.makedirs(LOG_DIR, exist_ok=True)
sys.meta_path.insert(0, _WrapOnImport())
