"""The Grafana dashboard in manifests/ only queries metrics Colocate exports, and shows them all."""

import json
import re
from pathlib import Path

from orchestrator.metrics import ALL_METRICS, exported_name

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "manifests" / "grafana-dashboard.json").read_text())
EXPORTED = {exported_name(s) for s in ALL_METRICS}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# A metric name in PromQL: Ray prefixes every metric it exports with `ray_`.
METRIC = re.compile(r"(?<![A-Za-z0-9_:])ray_[A-Za-z0-9_:]*")


def _panels(panels):
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


PANELS = list(_panels(DASHBOARD["panels"]))
VARIABLES = {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def _exprs():
    """(where, PromQL) for every panel target and every query variable."""
    for p in PANELS:
        for t in p.get("targets", []):
            yield f"panel {p['id']} {p['title']!r} target {t.get('refId')}", t.get("expr", "")
    for v in VARIABLES.values():
        if v["type"] == "query":
            q = v["query"]
            yield f"variable {v['name']}", q["query"] if isinstance(q, dict) else q


def test_every_panel_with_targets_has_an_expr():
    queried = [p for p in PANELS if p.get("targets")]
    assert queried
    for p in queried:
        assert any(t.get("expr", "").strip() for t in p["targets"]), p["title"]


def test_every_query_names_only_exported_metrics():
    for where, expr in _exprs():
        names = set(METRIC.findall(expr))
        assert names, f"{where} names no metric: {expr}"
        assert names <= EXPORTED, f"{where} names {sorted(names - EXPORTED)}, which nothing exports"


def test_every_exported_metric_is_on_some_panel():
    used = {n for p in PANELS for t in p.get("targets", []) for n in METRIC.findall(t.get("expr", ""))}
    assert EXPORTED - used == set()


def test_datasources_use_the_template_variable():
    assert VARIABLES["datasource"]["type"] == "datasource"
    assert VARIABLES["datasource"]["query"] == "prometheus"
    assert VARIABLES["replica"]["datasource"] == DATASOURCE
    assert "label_values(ray_colocate_" in VARIABLES["replica"]["definition"]
    for p in PANELS:
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == DATASOURCE, p["title"]


def test_panel_ids_are_unique():
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
