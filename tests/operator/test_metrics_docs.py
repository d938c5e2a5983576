"""Every metric the operator exports is documented in docs/install.md's table, with its type and labels."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from loraresume_operator import metrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "install.md"
TYPES = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}


def documented() -> dict[str, tuple[str, str]]:
    """Metric name -> (type, labels) from the table's rows."""
    rows = re.findall(r"^\| `(loraresume_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", DOCS.read_text(), re.MULTILINE)
    return {name: (kind, ", ".join(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def exported() -> dict[str, tuple[str, str]]:
    out = {}
    for value in vars(metrics).values():
        kind = TYPES.get(type(value))
        if kind is not None:
            name = value._name + ("_total" if kind == "counter" else "")
            out[name] = (kind, ", ".join(value._labelnames))
    return out


def test_every_exported_metric_is_documented_as_it_is():
    assert exported(), "no metric found in metrics.py"
    assert documented() == exported()
