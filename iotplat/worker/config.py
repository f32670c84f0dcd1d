"""Load and check the worker's config file (docs/worker-config.md, format version 1).

Stdlib only (tomllib): worker hosts install no YAML or pydantic. Every problem becomes one
``ConfigError`` whose ``str`` is a single line ``FILE: key.path: message`` that says how to fix it.
Secrets (passwords, tokens) are read from files here and never appear in an error or a log line.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
REPLICA_ENV = "IOTPLAT_WORKER_REPLICA"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MEASUREMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")


class ConfigError(Exception):
    """A bad config file. ``str(err)`` is one line: ``FILE: key.path: message``."""

    def __init__(self, file: str | os.PathLike[str], key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(f"{self.file}: {self.key}: {self.message}")


@dataclass(frozen=True)
class MqttConfig:
    host: str
    port: int
    protocol: int
    transport: str
    tls: bool
    ca_file: str
    server_name: str
    username: str
    password: str | None = field(repr=False)
    client_id: str
    keepalive: int
    session_expiry: int
    shared_group: str
    inflight: int
    reconnect_min: float
    reconnect_max: float


@dataclass(frozen=True)
class NatsConfig:
    """``[nats]``: consume from a NATS JetStream stream instead of an MQTT broker (docs/broker-engines.md).

    The worker pulls from one durable consumer per subscription filter (shared by every replica), on the
    stream nats-server's MQTT layer stores QoS 1 messages in before it acknowledges them to the device."""

    servers: tuple[str, ...]  # host:port of every cluster node's client listener
    tls: bool
    ca_file: str
    server_name: str  # the name the servers' certificates must carry ("" = the host)
    username: str
    password: str | None = field(repr=False)
    client_id: str  # the connection's name (shown in the server's monitoring); inbox prefix _INBOX.<client_id>
    inflight: int  # this replica's window of unacknowledged messages
    reconnect_min: float
    reconnect_max: float
    stream: str
    subject_prefix: str  # what the stream puts before the device's subject ("$MQTT.msgs.")
    durable_prefix: str
    ack_wait: float  # seconds before the server redelivers an unacknowledged message (to any replica)
    max_ack_pending: int  # the consumer's window, shared by all replicas
    max_deliver: int  # -1 = unlimited
    stream_manage: bool  # create the stream if missing and keep its limits as below
    stream_replicas: int
    stream_max_bytes: int  # -1 = unlimited
    stream_max_msgs: int
    stream_max_msg_size: int
    stream_discard: str  # "new": refuse (no PUBACK, devices retry) | "old": drop the oldest

    @property
    def inbox_prefix(self) -> str:
        return f"_INBOX.{self.client_id}"


@dataclass(frozen=True)
class InfluxConfig:
    version: int
    url: str
    ca_file: str
    timeout: float
    database: str
    retention_policy: str
    username: str
    password: str | None = field(repr=False)
    org: str
    bucket: str
    token: str | None = field(repr=False)


@dataclass(frozen=True)
class BatchConfig:
    max_points: int
    max_delay: float


@dataclass(frozen=True)
class SpoolConfig:
    dir: str
    max_bytes: int
    segment_bytes: int
    mode: str  # "outage" | "always"


@dataclass(frozen=True)
class DeadLetterConfig:
    measurement: str
    topic: str
    rate_per_device: float
    excerpt_bytes: int


@dataclass(frozen=True)
class HealthConfig:
    interval: float  # seconds between two points of the replica's own counters; 0 = off
    measurement: str
    host: str  # the ``host`` tag; "" = this machine's host name


@dataclass(frozen=True)
class LimitsConfig:
    max_payload: int
    max_json_depth: int
    max_fields: int


@dataclass(frozen=True)
class HttpConfig:
    listen: str
    port: int  # already offset by the replica number (port + N - 1); 0 = disabled


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str  # float | int | bool | string
    path: str
    required: bool


@dataclass(frozen=True)
class TimestampSpec:
    field: str
    unit: str  # s | ms | us | ns | rfc3339


@dataclass(frozen=True)
class Subscription:
    name: str
    topic: str
    qos: int
    format: str
    measurement: str
    tags: dict[str, str]
    timestamp: TimestampSpec | None
    fields: dict[str, FieldSpec]
    options: dict[str, Any]

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.topic.split("/"))

    @property
    def filter(self) -> str:
        """The MQTT topic filter: every ``{name}`` level becomes ``+``."""
        return "/".join("+" if topic_variable(s) is not None else s for s in self.topic.split("/"))


@dataclass(frozen=True)
class WorkerConfig:
    path: str
    replica: int
    mqtt: MqttConfig
    influxdb: InfluxConfig
    batch: BatchConfig
    spool: SpoolConfig
    dead_letters: DeadLetterConfig
    limits: LimitsConfig
    http: HttpConfig
    subscriptions: tuple[Subscription, ...]
    health: HealthConfig = HealthConfig(10.0, "iotplat_worker", "")
    nats: NatsConfig | None = None  # set instead of [mqtt]: the NATS JetStream transport

    @property
    def inflight(self) -> int:
        return self.nats.inflight if self.nats is not None else self.mqtt.inflight

    @property
    def client_id(self) -> str:
        return self.nats.client_id if self.nats is not None else self.mqtt.client_id

    @property
    def broker(self) -> str:
        """Where the worker consumes from, for logs."""
        if self.nats is not None:
            return ",".join(self.nats.servers)
        return f"{self.mqtt.host}:{self.mqtt.port}"

    def subscription_filter(self, sub: Subscription) -> str:
        if self.nats is None and self.mqtt.shared_group:
            return f"$share/{self.mqtt.shared_group}/{sub.filter}"
        return sub.filter


def topic_variable(level: str) -> str | None:
    """The name of a ``{name}`` topic level; None for a literal level."""
    return level[1:-1] if len(level) > 2 and level[0] == "{" and level[-1] == "}" else None


# --------------------------------------------------------------------------------------------
# Schema: key -> (type, default). A default of _REQUIRED means the key must be present.

_REQUIRED = object()

_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "mqtt": {
        "host": (str, _REQUIRED),
        "port": (int, 8883),
        "protocol": (int, 5),
        "transport": (str, "tcp"),
        "tls": (bool, True),
        "ca_file": (str, ""),
        "server_name": (str, ""),
        "username": (str, ""),
        "password_file": (str, ""),
        "client_id": (str, ""),
        "keepalive": (int, 30),
        "session_expiry": (int, 604800),
        "shared_group": (str, ""),
        "inflight": (int, 1000),
        "reconnect_min": ((int, float), 0.5),
        "reconnect_max": ((int, float), 10.0),
    },
    "influxdb": {
        "version": (int, 1),
        "url": (str, _REQUIRED),
        "ca_file": (str, ""),
        "timeout": ((int, float), 10.0),
        "database": (str, ""),
        "retention_policy": (str, ""),
        "username": (str, ""),
        "password_file": (str, ""),
        "org": (str, ""),
        "bucket": (str, ""),
        "token_file": (str, ""),
    },
    "nats": {
        "servers": (list, _REQUIRED),
        "tls": (bool, True),
        "ca_file": (str, ""),
        "server_name": (str, ""),
        "username": (str, ""),
        "password_file": (str, ""),
        "client_id": (str, ""),
        "inflight": (int, 1000),
        "reconnect_min": ((int, float), 0.5),
        "reconnect_max": ((int, float), 10.0),
        "stream": (str, "$MQTT_msgs"),
        "subject_prefix": (str, "$MQTT.msgs."),
        "durable_prefix": (str, "iotplat"),
        "ack_wait": ((int, float), 30.0),
        "max_ack_pending": (int, 0),
        "max_deliver": (int, -1),
        "stream_manage": (bool, True),
        "stream_replicas": (int, 1),
        "stream_max_bytes": (int, -1),
        "stream_max_msgs": (int, -1),
        "stream_max_msg_size": (int, -1),
        "stream_discard": (str, "new"),
    },
    "batch": {
        "max_points": (int, 5000),
        "max_delay": ((int, float), 0.2),
    },
    "spool": {
        "dir": (str, _REQUIRED),
        "max_bytes": (int, 1 << 30),
        "segment_bytes": (int, 16 << 20),
        "mode": (str, "outage"),
    },
    "dead_letters": {
        "measurement": (str, "iotplat_dead_letters"),
        "topic": (str, ""),
        "rate_per_device": ((int, float), 10.0),
        "excerpt_bytes": (int, 1024),
    },
    "limits": {
        "max_payload": (int, 65536),
        "max_json_depth": (int, 16),
        "max_fields": (int, 200),
    },
    "http": {
        "listen": (str, "127.0.0.1"),
        "port": (int, 9464),
    },
    "health": {
        "interval": ((int, float), 10.0),
        "measurement": (str, "iotplat_worker"),
        "host": (str, ""),
    },
}

_SUB_SCHEMA: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "name": (str, _REQUIRED),
    "topic": (str, _REQUIRED),
    "qos": (int, 1),
    "format": (str, "json"),
    "measurement": (str, _REQUIRED),
    "tags": (dict, {}),
    "timestamp": (dict, None),
    "fields": (dict, {}),
    "options": (dict, {}),
}
_TS_SCHEMA = {"field": (str, _REQUIRED), "unit": (str, "ms")}
_FIELD_SCHEMA = {"type": (str, "float"), "path": (str, ""), "required": (bool, False)}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a table",
               list: "an array", float: "a number"}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return "a number" if set(t) == {int, float} else " or ".join(_TYPE_NAMES[x] for x in t)
    return _TYPE_NAMES.get(t, t.__name__)


def _value_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return type(v).__name__


class _Loader:
    def __init__(self, path: Path, replica: int | None) -> None:
        self.path = path
        self.replica = replica

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.path, key, message)

    # -- generic table checking --------------------------------------------------------------
    def table(self, data: Any, key: str, schema: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.err(key, f"must be a table, got {_value_kind(data)}")
        for k in data:
            if k not in schema:
                hint = difflib.get_close_matches(k, list(schema), n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(sorted(schema))}"
                raise self.err(f"{key}.{k}" if key else k, f"unknown key; {fix}")
        out: dict[str, Any] = {}
        for k, (typ, default) in schema.items():
            full = f"{key}.{k}" if key else k
            if k not in data:
                if default is _REQUIRED:
                    raise self.err(full, "is required; add it to the file")
                out[k] = default
                continue
            v = data[k]
            ok = isinstance(v, typ) and not (isinstance(v, bool) and typ is not bool and bool not in (
                typ if isinstance(typ, tuple) else (typ,)))
            if not ok:
                raise self.err(full, f"must be {_type_name(typ)}, got {_value_kind(v)} ({_short(v)})")
            if isinstance(v, float) and not math.isfinite(v):
                raise self.err(full, f"must be a finite number, got {v}")
            if isinstance(v, str):
                v = self.subst(v, full)
            out[k] = v
        return out

    def subst(self, value: str, key: str) -> str:
        if "{replica}" not in value:
            return value
        if self.replica is None:
            raise self.err(key, "uses {replica} but no replica number was given; pass --replica N "
                                f"or set {REPLICA_ENV}")
        return value.replace("{replica}", str(self.replica))

    def rng(self, key: str, v: float, lo: float | None = None, hi: float | None = None) -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                raise self.err(key, f"must be between {lo} and {hi}, got {v}")
            if lo is not None:
                raise self.err(key, f"must be at least {lo}, got {v}")
            raise self.err(key, f"must be at most {hi}, got {v}")

    def choice(self, key: str, v: Any, allowed: tuple[Any, ...]) -> None:
        if v not in allowed:
            raise self.err(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {v!r}")

    def secret(self, key: str, name: str) -> str | None:
        """Read a secret file; ``name`` empty means no secret. Never put the content in errors."""
        if not name:
            return None
        p = Path(name)
        if not p.is_absolute():
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            p = Path(creds) / p if creds else self.path.parent / p
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise self.err(key, f"file {p} does not exist; create it (mode 0600) or fix the path") from None
        except IsADirectoryError:
            raise self.err(key, f"{p} is a directory; point it at the file holding the secret") from None
        except OSError as e:
            raise self.err(key, f"cannot read {p}: {e.strerror}; fix its permissions") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.err(key, f"{p} is not UTF-8 text; write the secret as one line of text") from None
        text = text.rstrip("\r\n")
        if not text or "\n" in text:
            raise self.err(key, f"{p} must hold exactly one non-empty line")
        return text

    def existing_file(self, key: str, name: str) -> str:
        if name and not Path(name).is_file():
            raise self.err(key, f"file {name} does not exist; fix the path")
        return name

    # -- sections ------------------------------------------------------------------------------
    def load(self) -> WorkerConfig:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(self.path, "file", "does not exist; pass the path of the worker config "
                                                 "(iotplat render writes etc/iotplat/worker.toml)") from None
        except IsADirectoryError:
            raise ConfigError(self.path, "file", "is a directory; pass the worker.toml file") from None
        except OSError as e:
            raise ConfigError(self.path, "file", f"cannot be read: {e.strerror}") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(self.path, "file", "is not UTF-8 text; save it as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(self.path, "toml", f"{e}; fix the TOML syntax") from None

        top = dict(_SCHEMA)
        allowed = set(top) | {"version", "subscriptions"}
        for k in data:
            if k not in allowed:
                hint = difflib.get_close_matches(k, sorted(allowed), n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"allowed: {', '.join(sorted(allowed))}"
                raise self.err(k, f"unknown key; {fix}")
        if "version" not in data:
            raise self.err("version", f"is required; add 'version = {FORMAT_VERSION}' at the top")
        ver = data["version"]
        if isinstance(ver, bool) or not isinstance(ver, int):
            raise self.err("version", f"must be an integer, got {_value_kind(ver)}")
        if ver != FORMAT_VERSION:
            raise self.err("version", f"format version {ver} is not supported by this worker, which reads "
                                      f"version {FORMAT_VERSION}; render the config with a matching iotplat")
        if "nats" in data and "mqtt" in data:
            raise self.err("nats", "[nats] and [mqtt] are two brokers; keep the one the platform runs")
        for sect in ("mqtt" if "nats" not in data else "nats", "influxdb", "spool"):
            if sect not in data:
                raise self.err(sect, f"section [{sect}] is required; add it (see docs/worker-config.md)")

        nats = None
        if "nats" in data:
            nats = self.nats(self.table(data["nats"], "nats", _SCHEMA["nats"]))
            mqtt = _NO_MQTT
        else:
            mqtt = self.mqtt(self.table(data["mqtt"], "mqtt", _SCHEMA["mqtt"]))
        influx = self.influx(self.table(data["influxdb"], "influxdb", _SCHEMA["influxdb"]))
        b = self.table(data.get("batch", {}), "batch", _SCHEMA["batch"])
        self.rng("batch.max_points", b["max_points"], 1, 1_000_000)
        self.rng("batch.max_delay", b["max_delay"], 0.001, 60)
        batch = BatchConfig(b["max_points"], float(b["max_delay"]))
        s = self.table(data["spool"], "spool", _SCHEMA["spool"])
        if not s["dir"]:
            raise self.err("spool.dir", "must not be empty; give a directory the worker may write")
        self.rng("spool.segment_bytes", s["segment_bytes"], 4096, 1 << 32)
        self.rng("spool.max_bytes", s["max_bytes"], 2 * s["segment_bytes"])
        self.choice("spool.mode", s["mode"], ("outage", "always"))
        spool = SpoolConfig(s["dir"], s["max_bytes"], s["segment_bytes"], s["mode"])
        d = self.table(data.get("dead_letters", {}), "dead_letters", _SCHEMA["dead_letters"])
        if not _MEASUREMENT_RE.match(d["measurement"]):
            raise self.err("dead_letters.measurement", f"{d['measurement']!r} is not a usable measurement "
                                                       "name; use letters, digits and _")
        if d["topic"]:
            self.topic_name("dead_letters.topic", d["topic"])
        self.rng("dead_letters.rate_per_device", d["rate_per_device"], 0)
        self.rng("dead_letters.excerpt_bytes", d["excerpt_bytes"], 16, 65536)
        dl = DeadLetterConfig(d["measurement"], d["topic"], float(d["rate_per_device"]), d["excerpt_bytes"])
        lm = self.table(data.get("limits", {}), "limits", _SCHEMA["limits"])
        self.rng("limits.max_payload", lm["max_payload"], 1, 256 << 20)
        self.rng("limits.max_json_depth", lm["max_json_depth"], 1, 1000)
        self.rng("limits.max_fields", lm["max_fields"], 1, 100_000)
        limits = LimitsConfig(lm["max_payload"], lm["max_json_depth"], lm["max_fields"])
        h = self.table(data.get("http", {}), "http", _SCHEMA["http"])
        self.rng("http.port", h["port"], 0, 65535)
        port = h["port"] + (self.replica or 1) - 1 if h["port"] else 0
        if port > 65535:
            raise self.err("http.port", f"port + replica - 1 = {port} exceeds 65535; lower http.port")
        http = HttpConfig(h["listen"], port)
        hc = self.table(data.get("health", {}), "health", _SCHEMA["health"])
        if hc["interval"] != 0 and not 0.1 <= hc["interval"] <= 86400:
            raise self.err("health.interval", f"must be 0 (off) or between 0.1 and 86400 seconds, got {hc['interval']}")
        if not _MEASUREMENT_RE.match(hc["measurement"]):
            raise self.err("health.measurement", f"{hc['measurement']!r} is not a usable measurement name; "
                                                 "use letters, digits and _")
        if hc["measurement"] == dl.measurement:
            raise self.err("health.measurement", f"{hc['measurement']!r} is dead_letters.measurement too; give the "
                                                 "worker's counters their own measurement")
        if hc["host"] and not re.match(r"^[A-Za-z0-9_.\-]{1,253}$", hc["host"]):
            raise self.err("health.host", "use letters, digits, '.', '-' or '_' (or \"\" for the host name)")
        health = HealthConfig(float(hc["interval"]), hc["measurement"], hc["host"])

        subs_raw = data.get("subscriptions")
        if not subs_raw:
            raise self.err("subscriptions", "at least one [[subscriptions]] table is required")
        if not isinstance(subs_raw, list):
            raise self.err("subscriptions", "must be an array of tables ([[subscriptions]])")
        subs = []
        names: set[str] = set()
        filters: dict[str, str] = {}
        for i, sr in enumerate(subs_raw):
            sub = self.subscription(sr, f"subscriptions[{i}]")
            if sub.name in names:
                raise self.err(f"subscriptions[{i}].name", f"duplicate subscription name {sub.name!r}; "
                                                           "give each subscription its own name")
            names.add(sub.name)
            if sub.filter in filters:
                raise self.err(f"subscriptions[{i}].topic", f"same topic filter as subscription "
                                                            f"{filters[sub.filter]!r}; merge them")
            filters[sub.filter] = sub.name
            if sub.measurement == health.measurement:
                raise self.err(f"subscriptions[{i}].measurement", f"{sub.measurement!r} is health.measurement, "
                                                                  "the worker's own counters; use another name")
            subs.append(sub)
        return WorkerConfig(str(self.path), self.replica or 1, mqtt, influx, batch, spool, dl, limits,
                            http, tuple(subs), health, nats)

    def nats(self, m: dict[str, Any]) -> NatsConfig:
        servers: list[str] = []
        for i, srv in enumerate(m["servers"]):
            key = f"nats.servers[{i}]"
            if not isinstance(srv, str):
                raise self.err(key, f"must be a string host:port, got {_value_kind(srv)}")
            srv = self.subst(srv, key)
            host, sep, port = srv.rpartition(":")
            if not sep or not re.fullmatch(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]", host) \
                    or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise self.err(key, f"{srv[:60]!r} is not host:port (a DNS name, IPv4 or [IPv6] and a port)")
            servers.append(srv)
        if not servers:
            raise self.err("nats.servers", "name at least one server (host:port); list every cluster node")
        self.rng("nats.inflight", m["inflight"], 1, 65535)
        self.rng("nats.reconnect_min", m["reconnect_min"], 0.01, 3600)
        self.rng("nats.reconnect_max", m["reconnect_max"], m["reconnect_min"], 3600)
        self.rng("nats.ack_wait", m["ack_wait"], 1, 3600)
        max_ack = m["max_ack_pending"] or m["inflight"]
        self.rng("nats.max_ack_pending", max_ack, m["inflight"], 1_000_000)
        if m["max_deliver"] != -1:
            self.rng("nats.max_deliver", m["max_deliver"], 2, 1_000_000)
        self.rng("nats.stream_replicas", m["stream_replicas"], 1, 5)
        for k in ("stream_max_bytes", "stream_max_msgs", "stream_max_msg_size"):
            if m[k] != -1:
                self.rng(f"nats.{k}", m[k], 1)
        self.choice("nats.stream_discard", m["stream_discard"], ("new", "old"))
        if not re.fullmatch(r"[A-Za-z0-9_$-]{1,64}", m["stream"]):
            raise self.err("nats.stream", "use 1-64 letters, digits, '_', '-' or '$'")
        if m["subject_prefix"] and not re.fullmatch(r"(?:[A-Za-z0-9_$-]+\.)+", m["subject_prefix"]):
            raise self.err("nats.subject_prefix", "must be subject tokens each followed by '.', e.g. '$MQTT.msgs.'")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", m["durable_prefix"]):
            raise self.err("nats.durable_prefix", "use 1-32 letters, digits, '_' or '-'")
        if m["tls"]:
            self.existing_file("nats.ca_file", m["ca_file"])
        client_id = m["client_id"] or m["username"]
        if not client_id:
            raise self.err("nats.client_id", "a stable name is needed; set nats.username or nats.client_id")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", client_id):
            raise self.err("nats.client_id", "use 1-64 letters, digits, '_' or '-' (it names the reply inbox)")
        password = self.secret("nats.password_file", m["password_file"])
        return NatsConfig(tuple(servers), m["tls"], m["ca_file"], m["server_name"], m["username"], password,
                          client_id, m["inflight"], float(m["reconnect_min"]), float(m["reconnect_max"]),
                          m["stream"], m["subject_prefix"], m["durable_prefix"], float(m["ack_wait"]), max_ack,
                          m["max_deliver"], m["stream_manage"], m["stream_replicas"], m["stream_max_bytes"],
                          m["stream_max_msgs"], m["stream_max_msg_size"], m["stream_discard"])

    def mqtt(self, m: dict[str, Any]) -> MqttConfig:
        if not m["host"]:
            raise self.err("mqtt.host", "must not be empty; name the broker host")
        self.rng("mqtt.port", m["port"], 1, 65535)
        self.choice("mqtt.protocol", m["protocol"], (5, 311))
        self.choice("mqtt.transport", m["transport"], ("tcp", "websockets"))
        if m["transport"] == "websockets":
            raise self.err("mqtt.transport", "'websockets' is not supported by this worker yet; use 'tcp'")
        self.rng("mqtt.keepalive", m["keepalive"], 5, 65535)
        self.rng("mqtt.session_expiry", m["session_expiry"], 0, 0xFFFFFFFF)
        self.rng("mqtt.inflight", m["inflight"], 1, 65535)
        self.rng("mqtt.reconnect_min", m["reconnect_min"], 0.01, 3600)
        self.rng("mqtt.reconnect_max", m["reconnect_max"], m["reconnect_min"], 3600)
        if m["shared_group"] and any(c in m["shared_group"] for c in "/+#"):
            raise self.err("mqtt.shared_group", "must not contain '/', '+' or '#'")
        if m["tls"]:
            self.existing_file("mqtt.ca_file", m["ca_file"])
        client_id = m["client_id"] or m["username"]
        if not client_id:
            raise self.err("mqtt.client_id", "a persistent session needs a stable client id; set "
                                             "mqtt.username or mqtt.client_id")
        password = self.secret("mqtt.password_file", m["password_file"])
        return MqttConfig(m["host"], m["port"], m["protocol"], m["transport"], m["tls"], m["ca_file"],
                          m["server_name"], m["username"], password, client_id, m["keepalive"],
                          m["session_expiry"], m["shared_group"], m["inflight"], float(m["reconnect_min"]),
                          float(m["reconnect_max"]))

    def influx(self, f: dict[str, Any]) -> InfluxConfig:
        self.choice("influxdb.version", f["version"], (1, 2))
        url = f["url"]
        if not re.match(r"^https?://[^/\s]+(/.*)?$", url):
            raise self.err("influxdb.url", f"must look like http(s)://host:port, got {url[:60]!r}")
        if "@" in url.split("/")[2]:
            raise self.err("influxdb.url", "must not contain credentials (user:password@); use "
                                           "influxdb.username + password_file or token_file")
        self.rng("influxdb.timeout", f["timeout"], 0.1, 600)
        if url.startswith("https://"):
            self.existing_file("influxdb.ca_file", f["ca_file"])
        password = token = None
        if f["version"] == 1:
            if not f["database"]:
                raise self.err("influxdb.database", "is required when influxdb.version = 1")
            if f["org"] or f["bucket"] or f["token_file"]:
                key = "org" if f["org"] else "bucket" if f["bucket"] else "token_file"
                raise self.err(f"influxdb.{key}", "is for influxdb.version = 2; remove it or set version = 2")
            password = self.secret("influxdb.password_file", f["password_file"])
            if password is not None and not f["username"]:
                raise self.err("influxdb.username", "is required when influxdb.password_file is set")
        else:
            for k in ("org", "bucket", "token_file"):
                if not f[k]:
                    raise self.err(f"influxdb.{k}", "is required when influxdb.version = 2")
            if f["database"] or f["retention_policy"] or f["username"] or f["password_file"]:
                key = next(k for k in ("database", "retention_policy", "username", "password_file") if f[k])
                raise self.err(f"influxdb.{key}", "is for influxdb.version = 1; remove it or set version = 1")
            token = self.secret("influxdb.token_file", f["token_file"])
        return InfluxConfig(f["version"], url.rstrip("/"), f["ca_file"], float(f["timeout"]), f["database"],
                            f["retention_policy"], f["username"], password, f["org"], f["bucket"], token)

    def topic_name(self, key: str, topic: str) -> None:
        if not topic or any(c in topic for c in "+#\0") or topic.startswith("$"):
            raise self.err(key, f"{topic!r} is not a topic one can publish to; no '+', '#', '$' prefix")

    def subscription(self, raw: Any, key: str) -> Subscription:
        s = self.table(raw, key, _SUB_SCHEMA)
        if not re.match(r"^[A-Za-z0-9_.\-]{1,64}$", s["name"]):
            raise self.err(f"{key}.name", "use 1-64 letters, digits, '_', '-' or '.'")
        topic = s["topic"]
        segs = topic.split("/")
        vars_seen: set[str] = set()
        if not topic or "\0" in topic:
            raise self.err(f"{key}.topic", "must be a non-empty topic template")
        for seg in segs:
            if seg in ("+", "#") or (("+" in seg or "#" in seg)):
                raise self.err(f"{key}.topic", f"{topic!r}: write {{name}} for a wildcard level, not '+' or '#'")
            if "{" in seg or "}" in seg:
                m = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", seg)
                if not m:
                    raise self.err(f"{key}.topic", f"level {seg!r} must be either text or exactly one "
                                                   "{name} (a whole level)")
                if m.group(1) in vars_seen:
                    raise self.err(f"{key}.topic", f"{{{m.group(1)}}} appears twice; use distinct names")
                vars_seen.add(m.group(1))
        if topic.startswith("$"):
            raise self.err(f"{key}.topic", "topics starting with '$' are broker-internal")
        self.rng(f"{key}.qos", s["qos"], 1, 1)
        if not re.match(r"^[A-Za-z0-9_.\-]+$", s["format"]):
            raise self.err(f"{key}.format", f"{s['format']!r} is not a decoder name")
        if not _MEASUREMENT_RE.match(s["measurement"]):
            raise self.err(f"{key}.measurement", f"{s['measurement']!r} is not a usable measurement name; "
                                                 "use letters, digits and _")
        tags: dict[str, str] = {}
        for tk, tv in s["tags"].items():
            if not isinstance(tv, str):
                raise self.err(f"{key}.tags.{tk}", f"must be a string, got {_value_kind(tv)}")
            for name in _PLACEHOLDER.findall(tv):
                if name not in vars_seen and name != "replica":
                    raise self.err(f"{key}.tags.{tk}", f"uses {{{name}}} which the topic template does not "
                                                       f"define (it has: {', '.join(sorted(vars_seen)) or 'none'})")
            if not tk or tk in vars_seen:
                raise self.err(f"{key}.tags.{tk}", "clashes with a topic template name; rename the tag")
            tags[tk] = self.subst(tv, f"{key}.tags.{tk}")
        ts = None
        if s["timestamp"] is not None:
            t = self.table(s["timestamp"], f"{key}.timestamp", _TS_SCHEMA)
            if not t["field"]:
                raise self.err(f"{key}.timestamp.field", "must name the payload field holding the timestamp")
            self.choice(f"{key}.timestamp.unit", t["unit"], ("s", "ms", "us", "ns", "rfc3339"))
            ts = TimestampSpec(t["field"], t["unit"])
        fields: dict[str, FieldSpec] = {}
        for fname, fraw in s["fields"].items():
            fk = f"{key}.fields.{fname}"
            fd = self.table(fraw, fk, _FIELD_SCHEMA)
            self.choice(f"{fk}.type", fd["type"], ("float", "int", "bool", "string"))
            if not fname or fname in vars_seen or fname in tags:
                raise self.err(fk, "a field must not share its name with a tag; rename it")
            fields[fname] = FieldSpec(fname, fd["type"], fd["path"] or fname, fd["required"])
        return Subscription(s["name"], topic, s["qos"], s["format"], s["measurement"], tags, ts, fields,
                            dict(s["options"]))


# WorkerConfig.mqtt of a config with [nats]: never connected to (the NATS transport reads WorkerConfig.nats)
_NO_MQTT = MqttConfig("", 0, 311, "tcp", False, "", "", "", None, "", 30, 0, "", 1, 0.5, 10.0)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def replica_from_env(value: int | None, file: str | os.PathLike[str]) -> int | None:
    """The replica number from ``--replica`` or ``$IOTPLAT_WORKER_REPLICA`` (None if neither)."""
    if value is not None:
        if value < 1:
            raise ConfigError(file, "replica", f"--replica must be 1 or more, got {value}")
        return value
    env = os.environ.get(REPLICA_ENV, "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) < 1:
        raise ConfigError(file, "replica", f"{REPLICA_ENV}={env[:20]!r} is not a replica number (1, 2, ...)")
    return int(env)


def load_config(path: str | os.PathLike[str], replica: int | None = None) -> WorkerConfig:
    """Read, check and resolve the worker config. Raises ``ConfigError`` (one line) on any problem."""
    replica = replica_from_env(replica, path)
    return _Loader(Path(path), replica).load()
