"""Grafana dashboards generated from the declared measurements, with InfluxQL queries.

InfluxQL (not Flux) because it is the common ground of InfluxDB 1.x, 2.x (v1 compatibility API with a
DBRP mapping) and 3.x. `queries()` lists every query with its time macros, so tests can expand the
macros and run each one against a real InfluxDB.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from iotplat.spec.platform_model import Platform, template_names

DATASOURCE_UID = "iotplat-influxdb"


def _uid(*parts: str) -> str:
    return "iotplat-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _q(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def panel_queries(platform: Platform) -> list[dict[str, Any]]:
    """Every panel query of every generated dashboard: {dashboard, panel, query}."""
    out: list[dict[str, Any]] = []
    for board in build_dashboards(platform).values():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append({"dashboard": board["title"], "panel": panel["title"], "query": target["query"]})
    return out


def build_dashboards(platform: Platform) -> dict[str, dict[str, Any]]:
    """file name -> dashboard JSON (as a dict)."""
    boards: dict[str, dict[str, Any]] = {}
    refresh = f"{int(platform.spec.grafana.dashboard_refresh)}s"
    for sub in platform.spec.ingestion.subscriptions:
        group_tag = "device" if "device" in template_names(sub.topic) else None
        panels = []
        numeric = [(n, f) for n, f in sorted(sub.fields.items()) if f.type in ("float", "int", "bool")]
        for i, (name, _f) in enumerate(numeric):
            query = f"SELECT mean({_q(name)}) FROM {_q(sub.measurement)} WHERE $timeFilter GROUP BY time($__interval)"
            if group_tag:
                query += f", {_q(group_tag)}"
            query += " fill(null)"
            panels.append(_panel(i, name, query, "timeseries", alias="$tag_device" if group_tag else name))
        count_q = f"SELECT count(*) FROM {_q(sub.measurement)} WHERE $timeFilter GROUP BY time($__interval) fill(0)"
        panels.append(_panel(len(panels), "messages stored", count_q, "timeseries"))
        title = f"{platform.name}: {sub.measurement}"
        boards[f"{sub.name}.json"] = _dashboard(_uid(platform.name, "sub", sub.name), title, panels, refresh)
    dl = platform.spec.ingestion.dead_letters.measurement
    health_panels = [
        _panel(0, "dead letters by reason",
               f'SELECT count("excerpt") FROM {_q(dl)} WHERE $timeFilter GROUP BY time($__interval), "reason" fill(0)',
               "timeseries", alias="$tag_reason"),
        _panel(1, "dead letters by device (top)",
               f'SELECT count("excerpt") FROM {_q(dl)} WHERE $timeFilter GROUP BY "device"', "table"),
    ]
    boards["platform-health.json"] = _dashboard(_uid(platform.name, "health"), f"{platform.name}: platform health",
                                                health_panels, refresh)
    return boards


def _panel(i: int, title: str, query: str, kind: str, alias: str = "") -> dict[str, Any]:
    target: dict[str, Any] = {"refId": "A", "rawQuery": True, "query": query, "resultFormat": "time_series"}
    if kind == "table":
        target["resultFormat"] = "table"
    if alias:
        target["alias"] = alias
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "influxdb", "uid": DATASOURCE_UID},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "targets": [target],
    }


def _dashboard(uid: str, title: str, panels: list[dict[str, Any]], refresh: str) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["iotplat"],
        "editable": False,
        "schemaVersion": 39,
        "refresh": refresh,
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }


def dashboard_bytes(board: dict[str, Any]) -> bytes:
    return (json.dumps(board, indent=2, sort_keys=True) + "\n").encode()
