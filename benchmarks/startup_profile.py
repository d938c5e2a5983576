"""Split a py-spy chrometrace profile (record --idle --threads --format chrometrace) of one trainer attempt
by the trainer's own start-up phases, and say per phase where the main thread's wall time went.

usage: python benchmarks/startup_profile.py PROF.json[.gz] EVENTS.txt [--top N] [--tree-min S] [--phase P] [--threads]

PROF: py-spy's chrometrace (a 'B'/'E' event per frame change, ts in microseconds since py-spy started, which
spawned the trainer). EVENTS.txt: the trainer's stdout lines, each prefixed with the epoch it was read at
(benchmarks/py_spy_trainer.sh's tee); its `startup` events give the phases in seconds since process start. The profile's
clock is lined up with the trainer's by the end of UnslothEngine.load_stack (= imports_done).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))
from loraresume_trainer.progress import STARTUP_PHASES  # the phases, in order

IMPORTLIB = ("<frozen importlib", "<frozen runpy")


def load(path):
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        return json.load(f)


SHORT_PATHS = (
    (r"(?:site-packages|dist-packages)/(.*)$", ""),
    (r"/(loraresume_trainer/.*)$", ""),
    (r"/lib/python3\.\d+/(.*)$", "stdlib/"),
    (r"unsloth_compiled_cache/(.*)$", "unsloth_compiled_cache/"),
)


def short(file):
    file = file or ""
    for pat, pre in SHORT_PATHS:
        m = re.search(pat, file)
        if m:
            return pre + m.group(1)
    return file


def segments(events):
    """-> {tid: [(t0, t1, stack)]}, root names; stack = tuple of (name, file, line)."""
    stacks = collections.defaultdict(list)
    last = {}
    segs = collections.defaultdict(list)
    roots = {}
    for e in events:
        tid = e["tid"]
        ts = e["ts"] / 1e6
        st = stacks[tid]
        if tid in last and st and ts > last[tid]:
            segs[tid].append((last[tid], ts, tuple(st)))
        last[tid] = ts
        fr = (e["name"], short(e["args"].get("filename")), e["args"].get("line"))
        if e["ph"] == "B":
            if not st:
                roots.setdefault(tid, set()).add(e["name"])
            st.append(fr)
        else:
            if st:
                st.pop()
    return segs, roots


def clip(segs, t0, t1):
    for a, b, s in segs:
        lo, hi = max(a, t0), min(b, t1)
        if hi > lo:
            yield hi - lo, s


def fkey(fr):
    return f"{fr[0]} ({fr[1]})"


def fline(fr):
    return f"{fr[0]} ({fr[1]}:{fr[2]})"


def category(stack):
    files = [f[1] for f in stack]
    names = [f[0] for f in stack]
    leaf = stack[-1]
    joined = " ".join(files)
    if "torch/_dynamo/convert_frame.py" in joined and any(
        n in ("_compile", "compile_inner", "_compile_inner") for n in names
    ):
        if "torch/_inductor/" in joined:
            sub = "inductor"
            if any(f.startswith("triton/") for f in files):
                sub += " > triton"
            if any("codecache" in f or "async_compile" in f for f in files):
                sub += " (codecache/async_compile)"
            return "dynamo compile > " + sub
        if "torch/_functorch/" in joined:
            return "dynamo compile > aot_autograd"
        return "dynamo compile > tracing (dynamo/fx)"
    if "torch/_dynamo/" in joined and any(n in ("_fn", "__call__") for n in names) and "guards" in joined:
        return "dynamo guards"
    if any(f.startswith("triton/") for f in files):
        return "triton (no dynamo frame)"
    if any(f.startswith("torch/_inductor/") for f in files):
        return "inductor runtime (no dynamo frame)"
    if any(f.startswith("bitsandbytes/") for f in files):
        return "bitsandbytes"
    if any(f.startswith("unsloth_compiled_cache/") or "unsloth_compiled" in f for f in files):
        return "unsloth compiled module (eager)"
    if leaf[0] in ("synchronize", "item", "_local_scalar_dense", "cpu", "tolist"):
        return f"GPU sync ({leaf[0]})"
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prof")
    ap.add_argument("events")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--tree-min", type=float, default=0.25, help="seconds: tree nodes below are pruned")
    ap.add_argument("--phase", action="append", help="only these phases (window end names)")
    ap.add_argument("--threads", action="store_true", help="also summarize the other threads per phase")
    a = ap.parse_args()

    events = load(a.prof)
    segs, roots = segments(events)
    pid = events[0]["pid"]
    main_tid = next(t for t, r in roots.items() if any(x.startswith(f"thread ({pid})") for x in r))
    ms = segs[main_tid]
    t_first, t_last = ms[0][0], ms[-1][1]

    startup, steps, t0_epoch = {}, [], None
    for line in open(a.events):
        ts, _, rest = line.partition(" ")
        try:
            ev = json.loads(rest)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "startup":
            startup[ev["phase"]] = float(ev["seconds"])
            if t0_epoch is None:
                t0_epoch = float(ts) - float(ev["seconds"])
        if ev.get("event") == "log" and "loss" in ev and t0_epoch is not None:
            steps.append((ev.get("step"), round(float(ts) - t0_epoch, 2)))

    # line the profile's clock up with the trainer's: the end of load_stack is imports_done
    def last_with(name):
        t = None
        for _x0, x1, s in ms:
            if any(f[0] == name for f in s):
                t = x1
        return t

    def first_with(name):
        for x0, _x1, s in ms:
            if any(f[0] == name for f in s):
                return x0
        return None

    end_imports = last_with("UnslothEngine.load_stack")
    offset = (end_imports - startup["imports_done"]) if end_imports and "imports_done" in startup else 0.0
    print(
        f"profile {a.prof}: main thread tid {main_tid} (pid {pid}), samples span {t_first:.2f}..{t_last:.2f} s of "
        f"py-spy's clock; offset to the trainer's clock {offset:+.3f} s (load_stack's end vs imports_done)"
    )
    print("threads:", sorted({r for rs in roots.values() for r in rs if ":" in r}))
    print("startup (s since process start):", json.dumps(startup))
    print("logged steps (step, s since process start):", steps)
    marks = {}
    for m in ["UnslothEngine.load_stack", "UnslothEngine.prepare", "Pipeline.fetch_candidate", "UnslothEngine.train",
              "load_model", "SFTTrainer.__init__", "Trainer.train", "Trainer._load_from_checkpoint",
              "Trainer._load_optimizer_and_scheduler", "Trainer._load_rng_state", "Trainer.training_step",
              "Trainer.compute_loss", "_exit_now"]:  # fmt: skip
        f, last = first_with(m), last_with(m)
        if f is not None:
            marks[m] = [round(f - offset, 2), round(last - offset, 2)]
    print("functions on the main thread (first, last seen; trainer clock s):", json.dumps(marks))

    windows, prev_name, prev_t = [], "process_start", 0.0
    for ph in STARTUP_PHASES:
        if ph in startup:
            windows.append((f"{prev_name} -> {ph}", ph, prev_t, startup[ph]))
            prev_name, prev_t = ph, startup[ph]
    later = [t for s, t in steps if t > prev_t + 0.05]
    if later:
        windows.append(("first_step -> the next logged step (a steady step, for reference)", "step2", prev_t, later[0]))
    windows.append(("after first_step -> exit", "rest", prev_t, t_last - offset))

    for label, ph, t0, t1 in windows:
        if a.phase and ph not in a.phase:
            continue
        items = list(clip(ms, t0 + offset, t1 + offset))
        total = sum(d for d, _ in items)
        print(f"\n=== {label}: {t1 - t0:.2f} s ({t0:.2f} .. {t1:.2f}); main thread sampled {total:.2f} s")
        if not items:
            continue
        selfc, cum, modcum, cats = (collections.Counter() for _ in range(4))
        for d, s in items:
            selfc[fkey(s[-1])] += d
            for k in {fkey(f) for f in s}:
                cum[k] += d
            for m in {f[1] for f in s if f[0] == "<module>"}:
                modcum[m] += d
            cats[category(s)] += d
        print("  by category:")
        for k, v in cats.most_common():
            if v >= 0.05:
                print(f"    {v:7.2f} s {100 * v / total:5.1f}%  {k}")
        print(f"  self (leaf function), top {a.top}:")
        for k, v in selfc.most_common(a.top):
            print(f"    {v:7.2f} s {100 * v / total:5.1f}%  {k}")
        print(f"  cumulative (function on the stack), top {a.top * 2}, leaving out frames on every sample:")
        shown = 0
        for k, v in cum.most_common():
            if v >= 0.995 * total or "<frozen" in k or k.startswith("thread ("):
                continue
            print(f"    {v:7.2f} s {100 * v / total:5.1f}%  {k}")
            shown += 1
            if shown >= a.top * 2:
                break
        if sum(v for v in modcum.values() if v < 0.995 * total) > 0.2 * total:
            print(f"  modules being imported (a module's body and all it imports, wall), top {a.top * 2}:")
            for k, v in [kv for kv in modcum.most_common() if kv[1] < 0.995 * total][: a.top * 2]:
                print(f"    {v:7.2f} s  {k}")
        tree = {}
        for d, s in items:
            node = tree
            for f in s:
                if f[1].startswith(IMPORTLIB):
                    continue
                node = node.setdefault(fline(f), {"#": 0.0})
                node["#"] += d
        print(f"  call tree (nodes >= {a.tree_min} s; importlib frames dropped; single-child chains collapsed):")
        emit(tree, a.tree_min, total)
        if a.threads:
            for tid, ss in segs.items():
                if tid == main_tid:
                    continue
                busy = collections.Counter()
                names = collections.Counter()
                for d, s in clip(ss, t0 + offset, t1 + offset):
                    names[s[0][0]] += d
                    if s[-1][0] not in IDLE:
                        busy[fkey(s[-1])] += d
                b = sum(busy.values())
                if b >= 0.3:
                    print(
                        f"  other thread(s) {dict((k, round(v, 1)) for k, v in names.most_common(3))}: {b:.2f} s "
                        f"not waiting; top leaves: " + "; ".join(f"{k} {v:.2f}" for k, v in busy.most_common(5))
                    )


IDLE = {"wait", "acquire", "select", "poll", "sleep", "_wait_for_tstate_lock", "recv", "recv_into", "accept",
        "readinto", "epoll", "get", "read", "_recv", "_recv_bytes", "Condition.wait", "Event.wait", "Queue.get",
        "SocketIO.readinto", "Connection._recv", "_worker", "Thread._wait_for_tstate_lock", "BaseSelector.select",
        "EpollSelector.select", "PollSelector.select", "SimpleQueue.get"}  # fmt: skip


def emit(tree, min_s, total, prefix=""):
    kids = sorted(((k, v) for k, v in tree.items() if k != "#"), key=lambda kv: -kv[1]["#"])
    for k, v in kids:
        if v["#"] < min_s:
            continue
        chain, node = [k], v
        while True:
            sig = [(kk, vv) for kk, vv in node.items() if kk != "#" and vv["#"] >= min_s]
            if len(sig) == 1 and sig[0][1]["#"] >= 0.97 * node["#"]:
                chain.append(sig[0][0])
                node = sig[0][1]
            else:
                break
        if len(chain) == 1:
            label = chain[0]
        elif len(chain) == 2:
            label = f"{chain[0]}  >>  {chain[1]}"
        else:
            label = f"{chain[0]}  >> ({len(chain) - 2}) >>  {chain[-1]}"
        print(f"{prefix}    {v['#']:7.2f} s {100 * v['#'] / total:5.1f}%  {label}")
        emit(node, min_s, total, prefix + "  ")


if __name__ == "__main__":
    sys.exit(main())
