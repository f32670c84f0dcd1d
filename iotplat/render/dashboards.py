"""Grafana dashboards generated from the declared measurements, with InfluxQL queries.

InfluxQL (not Flux) because it is the common ground of InfluxDB 1.x, 2.x (v1 compatibility API with a
DBRP mapping) and 3.x. `panel_queries()` (every dashboard) and `health_queries()` (the platform-health
dashboard) list every query with its time macros, so tests can expand the macros and run each one against
a real InfluxDB.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from iotplat.spec.platform_model import Platform, template_names

DATASOURCE_UID = "iotplat-influxdb"
HEALTH_BOARD = "platform-health.json"
# the columns of the "replicas: latest totals" table (fields of the worker's health points)
LATEST_FIELDS = ("received", "written", "dead_letters", "spool_bytes", "lag_seconds", "uptime_seconds")


def _uid(*parts: str) -> str:
    return "iotplat-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


def _q(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def panel_queries(platform: Platform) -> list[dict[str, Any]]:
    """Every panel query of every generated dashboard: {dashboard, panel, query, interval}."""
    return _queries(build_dashboards(platform).values())


def health_queries(platform: Platform) -> list[dict[str, Any]]:
    """The panel queries of the platform-health dashboard only (the worker's counters and the dead letters).
    ``interval`` is the panel's minimum $__interval (the health interval for the counter panels)."""
    return _queries([build_dashboards(platform)[HEALTH_BOARD]])


def _queries(boards: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for board in boards:
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append({"dashboard": board["title"], "panel": panel["title"], "query": target["query"],
                            "interval": panel.get("interval", "")})
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
    boards[HEALTH_BOARD] = _dashboard(_uid(platform.name, "health"), f"{platform.name}: platform health",
                                      health_panels(platform), refresh)
    return boards


def health_panels(platform: Platform) -> list[dict[str, Any]]:
    """The worker replicas' own counters (docs/worker.md#platform-health), then the dead letters.

    Counters are cumulative per process: rates are ``non_negative_derivative`` of each bucket's max, per
    (host, replica) series, which skips the drop to 0 at a restart. Each counter panel's minimum interval is
    the health interval, so a bucket is never narrower than the gap between two points."""
    ing = platform.spec.ingestion
    m = _q(ing.health.measurement)
    every = _grafana_interval(ing.health.interval)
    by = 'GROUP BY time($__interval), "host", "replica" fill(none)'
    alias = "$tag_host / replica $tag_replica"

    def rate(field: str) -> str:
        return f"SELECT non_negative_derivative(max({_q(field)}), 1s) FROM {m} WHERE $timeFilter {by}"

    panels = [
        _panel(0, "messages received per second, by replica", rate("received"), "timeseries", alias, every),
        _panel(1, "points written per second, by replica", rate("written"), "timeseries", alias, every),
        _panel(2, "dead letters per second, by replica", rate("dead_letters"), "timeseries", alias, every),
        _panel(3, "spool size (bytes), by replica",
               f'SELECT max("spool_bytes") FROM {m} WHERE $timeFilter {by}', "timeseries", alias, every),
        _panel(4, "lag: oldest unacknowledged message (s), by replica",
               f'SELECT max("lag_seconds") FROM {m} WHERE $timeFilter {by}', "timeseries", alias, every),
        _panel(5, "replicas: latest totals",
               "SELECT " + ", ".join(f"last({_q(f)}) AS {_q(f)}" for f in LATEST_FIELDS)
               + f' FROM {m} WHERE $timeFilter GROUP BY "host", "replica"', "table"),
    ]
    dl = _q(ing.dead_letters.measurement)
    panels += [
        _panel(6, "dead letters by reason",
               f'SELECT count("excerpt") FROM {dl} WHERE $timeFilter GROUP BY time($__interval), "reason" fill(0)',
               "timeseries", alias="$tag_reason"),
        _panel(7, "dead letters by device (top)",
               f'SELECT count("excerpt") FROM {dl} WHERE $timeFilter GROUP BY "device"', "table"),
    ]
    return panels


def _grafana_interval(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{int(round(seconds * 1000))}ms"


def _panel(i: int, title: str, query: str, kind: str, alias: str = "", interval: str = "") -> dict[str, Any]:
    target: dict[str, Any] = {"refId": "A", "rawQuery": True, "query": query, "resultFormat": "time_series"}
    if kind == "table":
        target["resultFormat"] = "table"
    if alias:
        target["alias"] = alias
    panel: dict[str, Any] = {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "influxdb", "uid": DATASOURCE_UID},
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "targets": [target],
    }
    if interval:
        panel["interval"] = interval  # Grafana's "min interval": $__interval never goes below it
    return panel


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
