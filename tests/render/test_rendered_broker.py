"""The rendered Mosquitto configuration, ACL and password file, run by a real Mosquitto 2.0.11.

The files are rendered by iotplat, their absolute paths rewritten into a temp folder and the listener
bound to 127.0.0.1 on a free port; everything else (TLS, auth, ACL, limits, persistence) is exactly what
a host receives. Secret files get the manifest's owner and mode (root:mosquitto 0640), so the broker's
privilege drop is exercised too.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from iotplat.commands import render
from iotplat.secrets.materials import ensure_materials, secret_content
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES, free_port, use_private_state

pytestmark = pytest.mark.integration
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    work = Path(tempfile_dir())
    spec = EXAMPLES / "aws" / "platform.yaml"  # per-device ACL lines + 2 worker replicas
    state_root = work / "state"
    restore_env = use_private_state(work)
    out = work / "build"
    render(str(spec), None, out_dir=str(out))
    platform = load_platform(spec)
    materials = ensure_materials(platform, State.open(state_root, platform.name, platform.environment))
    manifest = json.loads((out / "manifest.json").read_text())
    root = work / "host"
    port = free_port()
    gid = grp.getgrnam("mosquitto").gr_gid
    for f in manifest["files"]:
        if f["host"] != "edge" or f["service"] not in ("broker", "common"):
            continue
        dest = root / f["dest"].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f["class"] == "secret":
            dest.write_bytes(secret_content(f["secret"], materials))
        else:
            dest.write_bytes((out / f["path"]).read_bytes())
        os.chown(dest, 0, gid if f["group"] == "mosquitto" else 0)
        dest.chmod(int(f["mode"], 8))
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            d.chmod(0o755)
    conf = (root / "etc/mosquitto/mosquitto.conf").read_text()
    for absolute in ("/etc/mosquitto/iotplat/", "/etc/iotplat/tls/"):
        conf = conf.replace(absolute, str(root / absolute.lstrip("/")) + "/")
    persist = root / "var/lib/mosquitto"
    persist.mkdir(parents=True)
    os.chown(persist, 104 if _uid("mosquitto") is None else _uid("mosquitto"), gid)
    conf = conf.replace("persistence_location /var/lib/mosquitto/", f"persistence_location {persist}/")
    conf = conf.replace("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1")
    (root / "test.conf").write_text(conf)
    log = open(work / "mosquitto.log", "wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(root / "test.conf")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 10
    while time.time() < deadline:
        if b"running" in (work / "mosquitto.log").read_bytes():
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("mosquitto did not start: " + (work / "mosquitto.log").read_text())
    yield {"port": port, "ca": str(root / "etc/iotplat/tls/ca.crt"), "materials": materials, "log": work / "mosquitto.log",
           "persist": persist, "proc": proc, "platform": platform}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)
    log.close()
    shutil.rmtree(work, ignore_errors=True)
    restore_env()


def _uid(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def tempfile_dir() -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="iotplat-broker-")
    os.chmod(d, 0o755)
    return d


def _client(broker: dict, user: str | None, password: str | None, protocol=mqtt.MQTTv5,
            tls_version: ssl.TLSVersion | None = None, client_id: str = "") -> tuple[mqtt.Client, dict]:
    seen: dict = {"connect": None, "messages": [], "suback": None, "pubacks": {}}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or (user or "anon"), protocol=protocol)
    ctx = ssl.create_default_context(cafile=broker["ca"])
    ctx.check_hostname = False  # the certificate names broker.iotplat.internal; we dial 127.0.0.1
    if tls_version:
        ctx.minimum_version = ctx.maximum_version = tls_version
    c.tls_set_context(ctx)
    if user:
        c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, flags, rc, props=None: seen.__setitem__("connect", rc)
    c.on_message = lambda cl, ud, msg: seen["messages"].append((msg.topic, msg.payload))
    c.on_subscribe = lambda cl, ud, mid, rcs, props=None: seen.__setitem__("suback", rcs)
    c.on_publish = lambda cl, ud, mid, rc, props=None: seen["pubacks"].__setitem__(mid, rc)
    return c, seen


def _connect(broker: dict, *args, **kwargs) -> tuple[mqtt.Client, dict]:
    c, seen = _client(broker, *args, **kwargs)
    c.connect("127.0.0.1", broker["port"], keepalive=30)
    c.loop_start()
    deadline = time.time() + 5
    while seen["connect"] is None and time.time() < deadline:
        time.sleep(0.02)
    return c, seen


def _pw(broker: dict, user: str) -> str:
    return broker["materials"].mqtt_users[user][0]


def _wait(cond, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_device_data_reaches_worker_and_isolation_holds(broker: dict) -> None:
    w, wseen = _connect(broker, "iotplat-worker-1", _pw(broker, "iotplat-worker-1"))
    assert not wseen["connect"].is_failure
    w.subscribe("$share/iotplat/site/+/device/+/telemetry", qos=1)
    assert _wait(lambda: wseen["suback"] is not None)
    assert not wseen["suback"][0].is_failure
    dev, dseen = _connect(broker, "truck-001", _pw(broker, "truck-001"))
    assert not dseen["connect"].is_failure
    dev.publish("site/north/device/truck-001/telemetry", b'{"temperature": 21.5}', qos=1).wait_for_publish(5)
    # A foreign topic: truck-001 writing as truck-002, and into another site
    info = dev.publish("site/north/device/truck-002/telemetry", b'{"temperature": 99}', qos=1)
    info.wait_for_publish(5)
    dev.publish("site/south/device/truck-001/telemetry", b'{"temperature": 98}', qos=1).wait_for_publish(5)
    assert _wait(lambda: len(wseen["messages"]) >= 1)
    time.sleep(0.5)
    assert wseen["messages"] == [("site/north/device/truck-001/telemetry", b'{"temperature": 21.5}')]
    assert dseen["pubacks"][info.mid].value == 0x87  # MQTT 5: Not authorized
    # a device reads nothing: Mosquitto may grant the SUBSCRIBE, but the ACL filters every delivery
    spy, sseen = _connect(broker, "truck-002", _pw(broker, "truck-002"))
    for flt in ("#", "site/#", "$SYS/#", "iotplat/dead-letters"):
        spy.subscribe(flt, qos=1)
    time.sleep(0.3)
    w.publish("iotplat/dead-letters", b'{"reason": "test"}', qos=1).wait_for_publish(5)
    dev.publish("site/north/device/truck-001/telemetry", b'{"temperature": 22}', qos=1).wait_for_publish(5)
    assert _wait(lambda: len(wseen["messages"]) >= 2)
    time.sleep(0.5)
    assert sseen["messages"] == []
    for c in (w, dev, spy):
        c.loop_stop()
        c.disconnect()


def test_denied_publish_is_invisible_under_mqtt311_so_isolation_is_checked_at_the_subscriber(broker: dict) -> None:
    w, wseen = _connect(broker, "iotplat-worker-2", _pw(broker, "iotplat-worker-2"))
    w.subscribe("site/+/device/+/telemetry", qos=1)
    assert _wait(lambda: wseen["suback"] is not None)
    dev, dseen = _connect(broker, "truck-003", _pw(broker, "truck-003"), protocol=mqtt.MQTTv311)
    assert dseen["connect"] == 0
    dev.publish("site/north/device/truck-001/telemetry", b"spoof", qos=1).wait_for_publish(5)
    dev.publish("site/south/device/truck-003/telemetry", b"mine", qos=1).wait_for_publish(5)
    assert _wait(lambda: len(wseen["messages"]) >= 1)
    time.sleep(0.5)
    assert [m[1] for m in wseen["messages"]] == [b"mine"]
    for c in (w, dev):
        c.loop_stop()
        c.disconnect()


@pytest.mark.parametrize("user, password", [(None, None), ("truck-001", "wrong-password"), ("nobody", "x"),
                                            ("truck-001", ""), ("u" * 10000, "x")])
def test_bad_credentials_refused(broker: dict, user: str | None, password: str | None) -> None:
    c, seen = _connect(broker, user, password)
    assert seen["connect"] is not None and seen["connect"].is_failure
    c.loop_stop()
    c.disconnect()
    assert broker["proc"].poll() is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_refused_tls12_and_13_accepted(broker: dict) -> None:
    for version, ok in ((ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(broker["ca"])
        ctx.check_hostname = False
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.1, so only the broker can refuse it
        try:
            ctx.minimum_version = ctx.maximum_version = version
        except ValueError:
            continue
        import socket

        try:
            with socket.create_connection(("127.0.0.1", broker["port"]), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname="broker.iotplat.internal") as tls:
                    assert ok, f"{version} should be refused"
                    names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]
                    assert "broker.iotplat.internal" in names and "mqtt.fleet.example.com" in names
        except (ssl.SSLError, ConnectionResetError):
            assert not ok, f"{version} should be accepted"


def test_client_id_takeover_prevented(broker: dict) -> None:
    """use_username_as_clientid: truck-002 claiming truck-001's client id does not kick truck-001 off."""
    a, aseen = _connect(broker, "truck-001", _pw(broker, "truck-001"), client_id="shared-id")
    b, bseen = _connect(broker, "truck-002", _pw(broker, "truck-002"), client_id="shared-id")
    time.sleep(0.5)
    assert a.is_connected() and b.is_connected()
    for c in (a, b):
        c.loop_stop()
        c.disconnect()


def test_persistence_directory_is_writable(broker: dict) -> None:
    """SIGUSR1 makes Mosquitto save now; the db must appear (a root-owned dir silently loses everything)."""
    os.kill(broker["proc"].pid, signal.SIGUSR1)
    assert _wait(lambda: (broker["persist"] / "mosquitto.db").exists(), 5)
    assert b"Error saving" not in broker["log"].read_bytes()


def _dialled(broker: dict, domain: str):
    """The example platform with its listener on the test broker's port and network.domain = `domain` (so its
    broker's logical name is broker.<domain>), and the address every host is dialled at."""
    import dataclasses

    from iotplat.spec.model import Listener, Network

    p = broker["platform"]
    spec = p.spec.model_copy(update={
        "network": Network(domain=domain),
        "broker": p.spec.broker.model_copy(update={"listeners": [Listener(port=broker["port"])]}),
    })
    return dataclasses.replace(p, spec=spec), {h: "127.0.0.1" for h in p.host_names}


def test_canary_verifies_the_broker_certificate_for_its_logical_name(broker: dict) -> None:
    """The canary dials an address (127.0.0.1 here) and verifies the broker's certificate for broker.<domain>.
    With the rendered name the canary's publish is acknowledged (then InfluxDB, not running here, is not
    reached); when the expected name is another one, i.e. the broker presents a certificate for another name,
    the TLS handshake fails and no credential is sent."""
    from iotplat.verify.status import TrustStore, run_canary

    trust = TrustStore(broker["materials"].ca_cert_pem)
    try:
        p, addr = _dialled(broker, "iotplat.internal")
        good = run_canary(p, broker["materials"], addr, trust, timeout=0.5)
        assert good.detail.startswith("published to "), good.detail
        p, addr = _dialled(broker, "elsewhere.internal")
        bad = run_canary(p, broker["materials"], addr, trust, timeout=0.5)
        assert not bad.ok and bad.detail.startswith("cannot publish as iotplat-canary"), bad.detail
        assert "certificate" in bad.detail and "broker.elsewhere.internal" in bad.detail, bad.detail
    finally:
        trust.close()


def test_rotate_device_verifies_the_broker_certificate_for_its_logical_name(broker: dict) -> None:
    """`rotate device` ends the device's session over MQTT/TLS to the broker's address: the certificate must be
    valid for broker.<domain>; for another name the connection is refused (the function reports False)."""
    from types import SimpleNamespace

    from iotplat.deploy.rotate import _end_session

    m = broker["materials"]
    user = "iotplat-canary"
    for domain, expected in (("iotplat.internal", True), ("elsewhere.internal", False)):
        p, addr = _dialled(broker, domain)
        hosts = [SimpleNamespace(name=h, address=a) for h, a in addr.items()]
        ctx = SimpleNamespace(platform=p, materials=m)
        assert _end_session(ctx, hosts, user, m.mqtt_users[user][0]) is expected, domain


def test_named_tls_context_refuses_a_certificate_for_another_name(broker: dict) -> None:
    """The context paho is given: whatever server_hostname the client passes, it checks the logical name."""
    import socket

    from iotplat.verify.status import named_tls_context

    for name, ok in (("broker.iotplat.internal", True), ("mqtt.fleet.example.com", True),
                     ("influxdb.iotplat.internal", False), ("127.0.0.1", False)):
        ctx = named_tls_context(broker["ca"], name)
        with socket.create_connection(("127.0.0.1", broker["port"]), timeout=5) as s:
            try:
                with ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls:
                    assert ok, f"{name}: a certificate without this name was accepted"
                    assert tls.version() in ("TLSv1.2", "TLSv1.3")
            except ssl.SSLCertVerificationError as exc:
                assert not ok, f"{name}: {exc}"
