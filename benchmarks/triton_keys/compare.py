"""Which Triton kernels got a different cache key in different attempts, and which part of the key differed.

python3 benchmarks/triton_keys/compare.py $TKEY_DIR/*.jsonl
"""

from __future__ import annotations

import collections
import json
import sys

PARTS = ("tkey", "backend", "opts", "env", "fn_key", "src", "line", "file", "gvals", "deps")


def main(paths: list[str]) -> int:
    records = [json.loads(line) for path in paths for line in open(path)]
    same_kernel = collections.defaultdict(list)
    for r in records:
        same_kernel[(r["name"], r.get("consts"), r["attrs"], r["sig"])].append(r)
    differing = 0
    for (name, *_), group in same_kernel.items():
        if len({r["full"] for r in group}) < 2:
            continue
        differing += 1
        print(f"{name}: attempts {sorted({str(r['attempt']) for r in group})}")
        for part in PARTS:
            values = {json.dumps(r.get(part), sort_keys=True) for r in group}
            if len(values) > 1:
                print(f"    {part}: {[v[:200] for v in sorted(values)]}")
    print(f"{len(records)} compiles, {len(same_kernel)} kernels, {differing} with differing keys")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
