"""`iotplat rotate certs|secrets|device ID`: new certificates and credentials on a running platform, without
losing messages.

Every rotation is: change the state (iotplat/secrets/rotation.py, under the state lock), then deploy it
"rolling":

1. site.yml with the mosquitto (or nats) and worker roles skipped: every host gets the new ca.crt and server
   certificate (common role), InfluxDB the new users' passwords, Grafana its new credential;
2. playbooks/broker-reload.yml: the broker's key and password file, then a reload: Mosquitto re-reads its
   certificate, key and passwords on SIGHUP, so devices stay connected (a restart drops every connection,
   and with two worker replicas it lost ~15 messages in flight, measured with Mosquitto 2.0.11);
   on broker.engine nats playbooks/nats-reload.yml instead: node by node (serial: 1) the new nats-server.conf
   and key, `nats-server -t`, a reload (users, permissions, certificate and key; clients whose credentials
   still hold stay connected, the routes stay up: tests/nats/test_reload.py) and /healthz before the next;
3. playbooks/rolling-workers.yml: one worker replica at a time gets its new credential files, restarts and
   must answer /healthz with 200 before the next one restarts.

Between 1 and 3 a replica still running with an old credential is refused by InfluxDB: it spools to disk
and drains after its restart (the outage the worker is built for), so no message is lost. A failed
rotation leaves the new values in the state; `iotplat up` or the same command again converges the hosts.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotplat.deploy.ansible import PlaybookResult
from iotplat.deploy.ops import DEPLOYED, Context, Progress, open_context, status_of
from iotplat.errors import InvalidInput, IotplatError
from iotplat.secrets import rotation
from iotplat.secrets.passwords import generate_password
from iotplat.spec.platform_model import INFLUX_ADMIN_USER

if TYPE_CHECKING:
    from iotplat.spec.platform_model import Platform

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
# Why `rotate secrets` leaves the workers' MQTT passwords alone (measured with Mosquitto 2.0.11, Debian 12):
# a reload with a changed password disconnects the replica's session and the messages the shared
# subscription routes to it while it is away are dropped; if the session is offline instead, the broker
# aborts (will_delay__remove assertion) when the replica reconnects. A replica must leave the shared
# subscription (UNSUBSCRIBE, then DISCONNECT with session expiry 0) before its password can change.
MQTT_WORKER_NOTE = ("Mosquitto 2.0.11 drops the messages queued for a session whose password changes; "
                    "see iotplat/deploy/rotate.py")
# On broker.engine nats the reason does not hold: the replicas read through one durable JetStream consumer whose
# messages stay in the replicated stream while no replica is connected, and a message a replica had not acked is
# redelivered. So `rotate secrets` rotates the replicas' NATS passwords too: from the first node's reload until
# each replica's restart with its new credential a replica is refused (the cluster keeps acknowledging devices
# and the stream holds their messages, up to ingestion.outage_budget), then it catches up.
NATS_WORKER_NOTE = ("the worker replicas' NATS passwords: they pause from the first node's reload to their "
                    "restart, the durable consumer keeps their messages")


def _broker_playbook(p: Platform) -> tuple[str, str]:
    """(playbook, progress line) of step 2: Mosquitto reloads on its host; NATS nodes reload one at a time."""
    if p.spec.broker.engine == "nats":
        return ("nats-reload.yml", "[rotate] NATS nodes one at a time: new configuration and key, a reload "
                                   "(no restart), /healthz before the next")
    return "broker-reload.yml", "[rotate] broker: new key and password file, then a reload (no restart)"


def _deployed_context(spec: str | None, env: str | None, state_dir: str | None, out_dir: str | None,
                      progress: Progress) -> Context:
    ctx = open_context(spec, env, state_dir, out_dir, progress)
    if ctx.state.read_json(DEPLOYED) is None:
        raise IotplatError(f"{ctx.platform.key} has not been deployed from this state directory; run `iotplat up` "
                           "first (a new platform gets fresh certificates and credentials anyway)")
    return ctx


def _check(result: PlaybookResult, what: str) -> None:
    if result.returncode != 0 or result.failed:
        detail = "; ".join(result.failures[:3]) or (result.output.strip().splitlines() or ["see the output"])[-1]
        raise IotplatError(f"{what} failed: {detail}; the state already holds the new values: rerun the same "
                           "`iotplat rotate` (or `iotplat up`) once the cause is fixed")


def deploy_rolling(spec: str | None, env: str | None, *, state_dir: str | None, out_dir: str | None,
                   progress: Progress, services: bool = True, workers: bool = True,
                   verify: bool = True) -> dict[str, Any]:
    """Render from the (already changed) state and apply it: the services (with the broker and worker roles
    skipped), the broker with a reload, then the worker replicas one by one."""
    from iotplat.deploy.ansible import run_playbook

    started = time.monotonic()
    ctx = open_context(spec, env, state_dir, out_dir, progress)
    p = ctx.platform
    out: dict[str, Any] = {"services_changed": 0, "workers_restarted": []}
    with ctx.state.lock("rotate"):
        hosts = ctx.hosts()
        if services:
            progress("[rotate] services (the broker and the worker replicas come next)")
            # the roles tag every task with their name; their restart handlers are notified only by their own tasks
            # (nats: its handler would reload every node at once; nats-reload.yml does it one at a time)
            first = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None,
                                 skip_tags="mosquitto,nats,worker", progress=progress)
            _check(first, "deploying the new state to the services")
            out["services_changed"] = first.changed
        playbook, line = _broker_playbook(p)
        progress(line)
        broker = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, progress=progress,
                              playbook=str(PLAYBOOKS / playbook))
        _check(broker, "reloading the broker")
        if workers and p.replicas:
            progress(f"[rotate] worker replicas one at a time: {', '.join(f'{r.number}@{r.host}' for r in p.replicas)}")
            second = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, progress=progress,
                                  playbook=str(PLAYBOOKS / "rolling-workers.yml"))
            _check(second, "restarting the worker replicas")
            out["workers_restarted"] = [{"replica": r.number, "host": r.host} for r in p.replicas]
        ctx.state.write_json("manifest.json", json.loads((ctx.build / "manifest.json").read_text()))
        deployed = ctx.state.read_json(DEPLOYED) or {}
        deployed["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ctx.state.write_json(DEPLOYED, deployed)
    if verify:
        report = status_of(ctx, hosts)
        out["ok"] = report.ok
        out["status"] = [c.as_dict() for c in report.checks]
        for c in report.checks:
            if not (c.ok or c.skipped):
                progress(f"      FAIL {c.host:<10} {c.name}: {c.detail}")
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


# ------------------------------------------------------------------------------------------------ certs


def certs(spec: str | None, env: str | None, *, ca: bool = False, finish: bool = False, state_dir: str | None = None,
          out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:
    if finish and not ca:
        raise InvalidInput("--finish ends a CA rotation: use `iotplat rotate certs --ca --finish`")
    ctx = _deployed_context(spec, env, state_dir, out_dir, progress)
    p = ctx.platform
    result: dict[str, Any] = {"platform": p.name, "environment": p.environment}
    with ctx.state.lock("rotate certs"):
        if not ca:
            result["renewed"] = rotation.renew_server_certs(ctx.state)
            lines = [f"renewed the server certificates of {', '.join(result['renewed'])} (new keys, same CA)"]
        elif not finish:
            result["ca_rotation"] = rotation.start_ca_rotation(p, ctx.state)
            lines = [f"CA rotation started: every host and device kit now trusts the current and the new CA "
                     f"({result['ca_rotation']['subject']}); servers keep their certificates",
                     "next: give every device its new kit (`iotplat device kit ID` prints the CA bundle), then "
                     "`iotplat rotate certs --ca --finish` to switch the servers to the new CA and drop the old one"]
        else:
            result["ca_rotation"] = rotation.finish_ca_rotation(p, ctx.state)
            lines = [f"CA rotation finished: servers use certificates from the new CA; the old CA "
                     f"({result['ca_rotation']['dropped']}) is no longer trusted anywhere",
                     "devices still holding only the old ca.crt cannot connect any more: give them their new kit"]
        ctx.state.save()
    deployed = deploy_rolling(spec, env, state_dir=state_dir, out_dir=out_dir, progress=progress)
    result.update(deployed)
    result["lines"] = lines + [_summary(deployed)]
    return result


def _summary(deployed: dict[str, Any]) -> str:
    health = "" if "ok" not in deployed else ("; healthy" if deployed["ok"] else "; UNHEALTHY (see `iotplat status`)")
    return (f"deployed in {deployed['seconds']}s: {deployed['services_changed']} service change(s), broker "
            f"reloaded, {len(deployed['workers_restarted'])} worker replica(s) restarted one at a time{health}")


# ------------------------------------------------------------------------------------------------ secrets


def _influx_set_admin_password(ctx: Context, hosts: list, old: str, new: str) -> None:
    """SET PASSWORD for the InfluxDB 1.x admin, authenticated with the old one (the role cannot: it only knows
    the stored password). The statement goes in the POST body, never in a URL that could be logged. InfluxDB is
    internal: it is reached through an SSH tunnel to its host."""
    from iotplat.hosts.tunnel import forward
    from iotplat.verify.status import NamedHTTPS, TrustStore

    p = ctx.platform
    influx = {h.name: h for h in hosts}[p.host_of("influxdb")]
    trust = TrustStore(ctx.materials.ca_cert_pem)
    try:
        with forward(influx, p.spec.influxdb.port) as (address, port):
            conn = NamedHTTPS(address, port, trust.context(), p.service_name("influxdb"))
            body = urllib.parse.urlencode({"q": f"SET PASSWORD FOR \"{INFLUX_ADMIN_USER}\" = '{new}'"})
            auth = base64.b64encode(f"{INFLUX_ADMIN_USER}:{old}".encode()).decode()
            try:
                conn.request("POST", "/query", body=body, headers={
                    "Authorization": "Basic " + auth, "Content-Type": "application/x-www-form-urlencoded"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError as exc:
                raise IotplatError(f"cannot reach InfluxDB on {influx.name} (through SSH) to change the admin "
                                   f"password: {exc}; nothing was rotated") from None
            finally:
                conn.close()
    finally:
        trust.close()
    error = ""
    if resp.status == 200:
        try:
            error = (json.loads(data).get("results") or [{}])[0].get("error", "")
        except ValueError:
            error = "unreadable answer"
    if resp.status != 200 or error:
        raise IotplatError(f"InfluxDB refused to change the admin password (HTTP {resp.status} {error}); "
                           "nothing was rotated; check `iotplat status`")


def secrets(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
            progress: Progress = print) -> dict[str, Any]:

    ctx = _deployed_context(spec, env, state_dir, out_dir, progress)
    p = ctx.platform
    if p.spec.influxdb.version != 1:
        raise InvalidInput(f"{p.spec_file}: influxdb.version 2: rotating the InfluxDB 2 tokens is not supported yet; "
                           "nothing was changed")
    hosts = ctx.hosts()
    with ctx.state.lock("rotate secrets"):
        rotated, skipped = rotation.rotate_service_secrets(p, ctx.state)
        if p.spec.broker.engine == "nats" and p.replicas:  # NATS_WORKER_NOTE
            rotation.rotate_mqtt_passwords(ctx.state, [r.username for r in p.replicas])
            rotated.append("worker_nats_passwords")
        if getattr(p.spec.secrets, rotation.ADMIN_SECRET, None) is None:
            new_admin = generate_password()
            _influx_set_admin_password(ctx, hosts, ctx.materials.secrets[rotation.ADMIN_SECRET], new_admin)
            rotation.set_service_secret(ctx.state, rotation.ADMIN_SECRET, new_admin)
            rotated.append(rotation.ADMIN_SECRET)
        else:
            skipped.append(rotation.ADMIN_SECRET)
        ctx.state.save()  # the admin password already changed on InfluxDB: keep it now
    deployed = deploy_rolling(spec, env, state_dir=state_dir, out_dir=out_dir, progress=progress)
    lines = [f"rotated {', '.join(rotated)}"]
    if skipped:
        lines.append(f"not rotated (the spec reads them from a file or environment variable: change them there): "
                     f"{', '.join(skipped)}")
    if p.spec.broker.engine == "nats":
        lines.append("rotated " + NATS_WORKER_NOTE)
    else:
        lines.append("not rotated: the worker replicas' MQTT passwords (" + MQTT_WORKER_NOTE + ")")
    lines.append(_summary(deployed))
    return {"platform": p.name, "environment": p.environment, "rotated": rotated, "skipped": skipped,
            **deployed, "lines": lines}


# ------------------------------------------------------------------------------------------------ device


def _end_session(ctx: Context, hosts: list, client_id: str, password: str) -> bool:
    """End the client's session on the broker before its password changes: connect as it with a clean session
    (which also disconnects it if it is online), then disconnect. Mosquitto 2.0.11 aborts when a client
    reconnects to an offline session whose password a reload invalidated. Devices only publish (their ACL
    lets them read nothing), so their sessions hold no queued messages. False if the broker refused us."""
    import paho.mqtt.client as mqtt

    from iotplat.verify.status import TrustStore

    p = ctx.platform
    listener = next((lst for lst in p.spec.broker.listeners if lst.protocol == "mqtt"), None)
    if listener is None:
        return False
    address = {h.name: h.address for h in hosts}[p.host_of("broker")]
    trust = TrustStore(ctx.materials.ca_cert_pem)
    result: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=True)
    try:
        # the address is dialled, the certificate is verified for the broker's logical name
        client.tls_set_context(trust.for_name(p.service_name("broker")))
        client.username_pw_set(client_id, password)
        client.on_connect = lambda c, u, f, rc, pr=None: result.__setitem__("rc", rc)
        client.connect(address, listener.port, keepalive=10)
        deadline = time.monotonic() + 10
        while "rc" not in result and time.monotonic() < deadline:
            client.loop(timeout=0.2)
        client.disconnect()
    except (OSError, ValueError):
        return False
    finally:
        trust.close()
    rc = result.get("rc")
    return rc is not None and not rc.is_failure


def device(spec: str | None, env: str | None, device_id: str, *, state_dir: str | None = None,
           out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:

    ctx = _deployed_context(spec, env, state_dir, out_dir, progress)
    p = ctx.platform
    if not any(d.id == device_id for d in p.all_devices):
        raise InvalidInput(f"no device {device_id!r} in the registry of {p.key} (`iotplat device list`)")
    hosts = ctx.hosts()
    with ctx.state.lock("rotate device"):
        old_password = ctx.materials.mqtt_users[device_id][0]
        rotation.rotate_mqtt_passwords(ctx.state, [device_id])
        ctx.state.save()
    # nats: the reload itself closes the device's connection (its password no longer holds) and its MQTT session
    # lives in JetStream, not in a broker process a reconnect could crash (tests/nats/test_reload.py)
    ended = p.spec.broker.engine != "nats" and _end_session(ctx, hosts, device_id, old_password)
    deployed = deploy_rolling(spec, env, state_dir=state_dir, out_dir=out_dir, progress=progress, services=False,
                              workers=False, verify=False)
    where = f" {spec}" if spec else ""
    return {"platform": p.name, "environment": p.environment, "device": device_id, "session_ended": ended, **deployed,
            "lines": [f"reissued the credential of {device_id}: the broker refuses its old password from its next "
                      f"connect on; other devices are not affected ({deployed['seconds']}s)",
                      f"its new kit: `iotplat device kit {device_id}{where}` (shows the new secret)"]}
