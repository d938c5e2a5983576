"""Chaos benchmark: N seeded randomized runs against the local sandbox, every one must end Succeeded with an
adapter equal to an uninterrupted run's (see sandbox/loraresume_sandbox/chaos.py for what is disrupted).

    .venv/bin/python benchmarks/chaos.py --runs 50 --seed 7                       # ~45 s a run on 2 cores
    .venv/bin/python benchmarks/chaos.py --runs 50 --seed 7 --s3-fault-rate 0.05  # behind the S3 fault proxy
    .venv/bin/python benchmarks/chaos.py --runs 5 --seed 7 --plan-only            # print the schedule

Prints one line per run and the counts: runs, disruptions by kind (planned, delivered, hit their window),
mismatches, failures, wall time. Exits 1 on any mismatch or failure.
Logs: $TMPDIR/loraresume-chaos/<timestamp>/ (--workdir).
"""

from __future__ import annotations

import sys

from loraresume_sandbox.chaos import main

if __name__ == "__main__":
    sys.exit(main())
