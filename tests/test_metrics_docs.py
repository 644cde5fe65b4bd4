"""The Grafana dashboard in docs/ asks only for metrics ESP exports, and every metric ESP
exports is on it or in the configuration reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

from esp.metrics import Metrics

DOCS = Path(__file__).parent.parent / "docs"


def exported() -> dict[str, str]:
    """Series names a scrape can show, each with its family's name."""
    names = {}
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                    "gauge": ("",)}[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


def test_the_dashboard_uses_only_exported_metrics_and_shows_them_all() -> None:
    dashboard = json.loads((DOCS / "grafana" / "esp-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in expressions for name in re.findall(r"\besp_[a-z_]+", e)}
    series = exported()
    assert used - set(series) == set(), "the dashboard asks for series ESP does not export"
    assert {series[n] for n in used} == set(series.values()), "metrics missing from the dashboard"


def test_every_metric_is_documented() -> None:
    text = (DOCS / "events.md").read_text()
    missing = [name for name in set(exported().values()) if f"`{name}" not in text]
    assert missing == []
