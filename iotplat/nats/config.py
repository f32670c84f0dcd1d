"""nats-server.conf for one node of a 1-, 3- or 5-node cluster.

What every rendered node gets:
- a client listener (the workers) and an MQTT listener (the devices), both TLS only with the platform's
  server certificate; the client port is not for devices (each device user may connect over MQTT only);
- cluster routes (3 or 5 nodes) over TLS with verification both ways (each node presents its certificate
  to the others; it must carry the clientAuth usage as well as serverAuth), routes listed explicitly and not
  advertised to clients; each node advertises its route address by the name the others dial (gossiped
  routes then verify a name the certificate carries, not the listener's IP);
- the monitoring port (``/varz``, ``/routez``, ``/jsz``; ``status`` reads it) on an internal address only:
  an unspecified (0.0.0.0, ::) or public address is refused;
- JetStream with its store directory and limits; MQTT's own streams replicated on every node up to 3;
- one account holding every user: no anonymous access (no ``no_auth_user``), passwords only as bcrypt
  hashes (nats-server checks a ``$2a$``/``$2b$`` password with bcrypt), each user's permissions and the
  connection types it may use (devices: MQTT only; workers: the NATS protocol only).

Every value that reaches the file is checked against a closed form (names, addresses, bcrypt hashes,
subjects) and then written as a double-quoted string escaped for the NATS config format, so no value can
add a key, a block or an ``include``: the format's double-quoted strings take no variables and only the
escapes ``\\\\ \\" \\t \\n \\r \\xHH`` (conf/lex.go), and every byte outside printable ASCII is written as ``\\xHH``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

CLUSTER_SIZES = (1, 3, 5)
CONNECTION_TYPES = ("STANDARD", "MQTT", "WEBSOCKET", "LEAFNODE")

_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_USER_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
_DNS_RE = re.compile(r"\A(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_BCRYPT_RE = re.compile(r"\A\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
_PATH_RE = re.compile(r"\A/[^\x00-\x1f\x7f-\x9f]{0,4095}\Z")
_SIZE_UNITS = ("", "K", "M", "G", "T")


class NatsConfigError(ValueError):
    """A value that cannot be rendered into nats-server.conf; the message names the field."""


@dataclass(frozen=True)
class Listen:
    host: str  # an IP address or a DNS name
    port: int


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str  # absolute paths on the broker host
    key_file: str
    ca_file: str


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish to and subscribe to; an empty tuple allows none ("deny >")."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    allow_responses: bool = False


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str = field(repr=False)  # bcrypt, e.g. iotplat.secrets.passwords.bcrypt_hash()
    permissions: Permissions
    connection_types: tuple[str, ...]


@dataclass(frozen=True)
class Node:
    """One cluster member: its server name and where the other nodes reach its route listener."""

    name: str
    route_host: str  # IP or DNS name
    route_port: int = 6222


@dataclass(frozen=True)
class JetStreamLimits:
    store_dir: str
    max_file_store: int  # bytes on this node for all streams
    max_memory_store: int = 64 << 20


@dataclass(frozen=True)
class NodeConfig:
    """Everything one node's nats-server.conf says."""

    cluster_name: str
    node: Node
    nodes: tuple[Node, ...]  # every member, this one included (1, 3 or 5)
    client: Listen
    mqtt: Listen
    cluster_listen: Listen | None  # None on a single node
    monitor: Listen | None
    tls: TlsFiles
    jetstream: JetStreamLimits
    users: tuple[User, ...]
    account: str = "IOTPLAT"
    mqtt_ack_wait: float = 30.0  # seconds: MQTT QoS 1 redelivery to MQTT subscribers
    mqtt_max_ack_pending: int = 1024
    max_payload: int = 1 << 20  # largest message (MQTT PUBLISH payload)
    max_connections: int = 0  # 0 = the server's default (64k)
    lame_duck_duration: float = 30.0  # seconds over which a stopping node closes its clients (SIGUSR2 / stop)


def quote(value: str) -> str:
    """A double-quoted NATS config string holding exactly ``value``."""
    out = ['"']
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    out.append('"')
    return "".join(out)


def check_subject(subject: str, what: str) -> None:
    """A NATS subject for a permission: tokens separated by '.', none empty, no whitespace or control
    characters, ``*`` and ``>`` only as whole tokens and ``>`` only last."""
    if not subject or len(subject) > 1024:
        raise NatsConfigError(f"{what}: a subject must have 1-1024 characters")
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if not tok:
            raise NatsConfigError(f"{what}: {subject!r} has an empty token")
        if any(c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in tok):
            raise NatsConfigError(f"{what}: {subject!r} contains whitespace or a control character")
        if tok == ">" and i != len(tokens) - 1:
            raise NatsConfigError(f"{what}: {subject!r}: '>' must be the last token")
        if tok not in ("*", ">") and ("*" in tok or ">" in tok):
            # nats-server treats them as literal characters; refused so nobody reads them as wildcards
            raise NatsConfigError(f"{what}: {subject!r}: '*' and '>' only as whole tokens")


def _host(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_RE.match(value):
        raise NatsConfigError(f"{what}: {value!r} is neither an IP address nor a DNS name")
    return value


def _hostport(listen: Listen, what: str) -> str:
    if not 1 <= listen.port <= 65535:
        raise NatsConfigError(f"{what}: port {listen.port} is outside 1-65535")
    host = _host(listen.host, what)
    return f"[{host}]:{listen.port}" if ":" in host else f"{host}:{listen.port}"


def _internal(listen: Listen, what: str) -> str:
    """The monitoring listener: a specific, non-public address (no TLS or auth on it in nats-server 2.9)."""
    try:
        ip = ipaddress.ip_address(listen.host)
    except ValueError:
        raise NatsConfigError(f"{what}: {listen.host!r}: give the host's internal IP address (not a name)") from None
    if ip.is_unspecified or ip.is_global or ip.is_multicast:
        raise NatsConfigError(f"{what}: {ip} is not an internal address; bind monitoring to the host's private "
                              "or loopback address (it has no authentication)")
    return _hostport(listen, what)


def _path(value: str, what: str) -> str:
    if not _PATH_RE.match(value):
        raise NatsConfigError(f"{what}: {value!r} must be an absolute path without control characters")
    return value


def _size(n: int, what: str) -> str:
    if n < 0:
        raise NatsConfigError(f"{what}: must be >= 0")
    return str(int(n))


def _duration(seconds: float, what: str) -> str:
    if not 0 < seconds <= 86400:
        raise NatsConfigError(f"{what}: must be between 0 and 86400 seconds")
    return quote(f"{int(round(seconds * 1000))}ms")


def _list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(quote(v) for v in values) + "]"


def check(cfg: NodeConfig) -> None:
    """Every rule of the file; raises NatsConfigError naming the first field that breaks one."""
    if len(cfg.nodes) not in CLUSTER_SIZES:
        raise NatsConfigError(f"nodes: a cluster has 1, 3 or 5 nodes (Raft needs a majority), got {len(cfg.nodes)}")
    names = [n.name for n in cfg.nodes]
    if len(set(names)) != len(names):
        raise NatsConfigError(f"nodes: server names must be unique, got {names}")
    if cfg.node not in cfg.nodes:
        raise NatsConfigError(f"node: {cfg.node.name!r} is not one of nodes")
    for what, value in (("cluster_name", cfg.cluster_name), ("account", cfg.account)):
        if not _NAME_RE.match(value):
            raise NatsConfigError(f"{what}: {value!r}: use 1-64 letters, digits, '_' or '-'")
    for n in cfg.nodes:
        if not _NAME_RE.match(n.name):
            raise NatsConfigError(f"nodes.{n.name!r}: a server name is 1-64 letters, digits, '_' or '-'")
        _host(n.route_host, f"nodes.{n.name}.route_host")
        if not 1 <= n.route_port <= 65535:
            raise NatsConfigError(f"nodes.{n.name}.route_port: outside 1-65535")
    if len(cfg.nodes) > 1 and cfg.cluster_listen is None:
        raise NatsConfigError("cluster_listen: a cluster of several nodes needs a route listener")
    seen: set[str] = set()
    for u in cfg.users:
        where = f"users.{u.name!r}"
        if not _USER_RE.match(u.name):
            raise NatsConfigError(f"{where}: a user name is 1-64 letters, digits, '_' or '-'")
        if u.name in seen:
            raise NatsConfigError(f"{where}: duplicate user")
        seen.add(u.name)
        if not _BCRYPT_RE.match(u.password_hash):
            raise NatsConfigError(f"{where}.password_hash: not a bcrypt hash ($2a$/$2b$, cost 04-31)")
        if not u.connection_types or any(t not in CONNECTION_TYPES for t in u.connection_types):
            raise NatsConfigError(f"{where}.connection_types: one or more of {', '.join(CONNECTION_TYPES)}")
        for s in u.permissions.publish:
            check_subject(s, f"{where}.permissions.publish")
        for s in u.permissions.subscribe:
            check_subject(s, f"{where}.permissions.subscribe")
    if not cfg.users:
        raise NatsConfigError("users: at least one user (there is no anonymous access)")
    if not 1 <= cfg.mqtt_max_ack_pending <= 0xFFFF:
        raise NatsConfigError("mqtt_max_ack_pending: between 1 and 65535")
    if not 1024 <= cfg.max_payload <= 64 << 20:
        raise NatsConfigError("max_payload: between 1 KiB and 64 MiB")


def _permissions(p: Permissions) -> str:
    pub = f"{{allow: {_list(p.publish)}}}" if p.publish else f'{{deny: {quote(">")}}}'
    sub = f"{{allow: {_list(p.subscribe)}}}" if p.subscribe else f'{{deny: {quote(">")}}}'
    extra = ", allow_responses: true" if p.allow_responses else ""
    return f"{{publish: {pub}, subscribe: {sub}{extra}}}"


def render_node(cfg: NodeConfig) -> str:
    """The text of ``nats-server.conf`` for ``cfg.node`` (checked first: raises NatsConfigError)."""
    check(cfg)
    t = cfg.tls
    tls_block = (f"cert_file: {quote(_path(t.cert_file, 'tls.cert_file'))}, "
                 f"key_file: {quote(_path(t.key_file, 'tls.key_file'))}, "
                 f"ca_file: {quote(_path(t.ca_file, 'tls.ca_file'))}")
    js = cfg.jetstream
    lines = [
        "# nats-server.conf rendered by iotplat: every value derived from the platform spec.",
        f"server_name: {quote(cfg.node.name)}",
        f"listen: {quote(_hostport(cfg.client, 'client'))}",
        f"tls {{ {tls_block}, timeout: 5 }}",
        f"max_payload: {_size(cfg.max_payload, 'max_payload')}",
        f"lame_duck_duration: {_duration(cfg.lame_duck_duration, 'lame_duck_duration')}",
    ]
    if cfg.max_connections:
        lines.append(f"max_connections: {_size(cfg.max_connections, 'max_connections')}")
    if cfg.monitor is not None:
        lines.append(f"http: {quote(_internal(cfg.monitor, 'monitor'))}")
    lines += [
        "",
        "jetstream {",
        f"  store_dir: {quote(_path(js.store_dir, 'jetstream.store_dir'))}",
        f"  max_file_store: {_size(js.max_file_store, 'jetstream.max_file_store')}",
        f"  max_memory_store: {_size(js.max_memory_store, 'jetstream.max_memory_store')}",
        "}",
        "",
        "mqtt {",
        f"  listen: {quote(_hostport(cfg.mqtt, 'mqtt'))}",
        f"  tls {{ {tls_block}, timeout: 5 }}",
        f"  ack_wait: {_duration(cfg.mqtt_ack_wait, 'mqtt_ack_wait')}",
        f"  max_ack_pending: {cfg.mqtt_max_ack_pending}",
        f"  stream_replicas: {min(3, len(cfg.nodes))}",
        "}",
    ]
    if len(cfg.nodes) > 1:
        assert cfg.cluster_listen is not None
        routes = [f"nats-route://{_route_host(n)}:{n.route_port}" for n in cfg.nodes if n != cfg.node]
        lines += [
            "",
            "cluster {",
            f"  name: {quote(cfg.cluster_name)}",
            f"  listen: {quote(_hostport(cfg.cluster_listen, 'cluster_listen'))}",
            "  no_advertise: true",
            # the address the other nodes learn for this one (route gossip): its own name, so an implicit
            # route verifies the certificate for a name it carries, never for a bare IP of the listener
            f"  advertise: {quote(_route_host(cfg.node) + ':' + str(cfg.node.route_port))}",
            f"  tls {{ {tls_block}, verify: true, timeout: 5 }}",
            f"  routes: {_list(routes)}",
            "}",
        ]
    lines += ["", "accounts {", f"  {quote(cfg.account)}: {{", "    jetstream: enabled", "    users: ["]
    for u in cfg.users:
        lines.append(f"      {{user: {quote(u.name)}, password: {quote(u.password_hash)}, "
                     f"allowed_connection_types: {_list(u.connection_types)}, "
                     f"permissions: {_permissions(u.permissions)}}}")
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def _route_host(n: Node) -> str:
    host = _host(n.route_host, f"nodes.{n.name}.route_host")
    return f"[{host}]" if ":" in host else host


def cluster_configs(cluster_name: str, nodes: tuple[Node, ...], *, client_port: int, mqtt_port: int,
                    bind: str, monitor: dict[str, Listen] | None, tls: TlsFiles, jetstream: JetStreamLimits,
                    users: tuple[User, ...], **options: object) -> dict[str, str]:
    """{server name: nats-server.conf} for every node of the cluster; the files differ only in
    ``server_name``, the routes (each node lists the others) and the monitoring address."""
    out: dict[str, str] = {}
    for n in nodes:
        cfg = NodeConfig(
            cluster_name=cluster_name, node=n, nodes=nodes, client=Listen(bind, client_port),
            mqtt=Listen(bind, mqtt_port), cluster_listen=Listen(bind, n.route_port) if len(nodes) > 1 else None,
            monitor=(monitor or {}).get(n.name), tls=tls, jetstream=jetstream, users=users,
            **options,  # type: ignore[arg-type]
        )
        out[n.name] = render_node(cfg)
    return out


__all__ = ["CLUSTER_SIZES", "JetStreamLimits", "Listen", "Node", "NodeConfig", "NatsConfigError", "Permissions",
           "TlsFiles", "User", "check", "check_subject", "cluster_configs", "quote", "render_node"]
