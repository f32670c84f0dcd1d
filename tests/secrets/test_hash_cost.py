"""Hash cost by the secret's source (iotplat/secrets/passwords.py): generated secrets get the minimal cost, supplied
ones stay stretched, a spec that sets broker.auth.hash_iterations keeps getting it, and old hashes stay valid:
real Mosquitto 2.0.11 and nats-server 2.9.10 accept a password file / config mixing old and new costs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from iotplat.secrets.materials import bcrypt_hashes, ensure_materials, mqtt_hash_iterations
from iotplat.secrets.passwords import (GENERATED_BCRYPT_COST, GENERATED_PBKDF2_ITERATIONS, SUPPLIED_BCRYPT_COST,
                                       SecretSource, bcrypt_cost, bcrypt_hash, bcrypt_hash_cost, hash_iterations,
                                       mosquitto_hash, pbkdf2_iterations, verify_bcrypt, verify_mosquitto_hash)
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import PLATFORM_DIR

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)


def _spec(tmp_path: Path, auth: str = "") -> Path:
    spec = tmp_path / "platform.yaml"
    text = (PLATFORM_DIR / "platform.yaml").read_text().replace("devices:\n  registry: devices.csv\n", "devices:\n")
    spec.write_text(text.replace("broker:\n", f"broker:\n  auth: {{{auth}}}\n") if auth else text)
    return spec


def _materials(spec: Path, root: Path):
    platform = load_platform(spec)
    state = State.open(root, platform.name, platform.environment)
    m = ensure_materials(platform, state)
    state.save()
    return platform, state, m


def test_policy() -> None:
    assert pbkdf2_iterations(SecretSource.GENERATED, 10000) == GENERATED_PBKDF2_ITERATIONS == 1
    assert pbkdf2_iterations(SecretSource.SUPPLIED, 10000) == 10000
    assert bcrypt_cost(SecretSource.GENERATED) == GENERATED_BCRYPT_COST == 4
    assert bcrypt_cost(SecretSource.SUPPLIED) == SUPPLIED_BCRYPT_COST == 11
    h = bcrypt_hash("a-generated-secret-0123456789abcd", 4)
    assert bcrypt_hash_cost(h) == 4 and verify_bcrypt("a-generated-secret-0123456789abcd", h)
    assert not verify_bcrypt("a-generated-secret-0123456789abcX", h) and not verify_bcrypt("x", "not a hash")
    with pytest.raises(ValueError, match="72 bytes"):
        bcrypt_hash("x" * 73, 4)


def test_generated_secrets_get_the_minimal_cost(isolated_state: Path, tmp_path: Path) -> None:
    platform, state, m = _materials(_spec(tmp_path), isolated_state)
    assert m.hashes_computed == len(m.mqtt_users) > 0
    for password, h in m.mqtt_users.values():
        assert hash_iterations(h) == 1 and verify_mosquitto_hash(password, h)
    assert mqtt_hash_iterations(platform, SecretSource.SUPPLIED) == 10000  # the spec's default, for people's secrets
    hashes, computed = bcrypt_hashes(state, sorted(m.mqtt_users))
    assert computed == len(m.mqtt_users) and all(bcrypt_hash_cost(h) == 4 for h in hashes.values())
    assert all(verify_bcrypt(m.mqtt_users[u][0], h) for u, h in hashes.items())
    state.save()
    _, state2, m2 = _materials(_spec(tmp_path), isolated_state)  # warm: nothing recomputed
    again, computed2 = bcrypt_hashes(state2, sorted(m2.mqtt_users))
    assert m2.hashes_computed == 0 and computed2 == 0 and again == hashes


def test_explicit_spec_iterations_are_honoured(isolated_state: Path, tmp_path: Path) -> None:
    _, _, m = _materials(_spec(tmp_path, "hash_iterations: 20000"), isolated_state)
    assert all(hash_iterations(h) == 20000 for _, h in m.mqtt_users.values())


def test_a_supplied_secret_stays_stretched(isolated_state: Path, tmp_path: Path) -> None:
    platform, state, m = _materials(_spec(tmp_path), isolated_state)
    user = platform.canary.id
    state.doc("users")["users"][user]["source"] = "supplied"
    state.mark("users")
    m2 = ensure_materials(platform, state)
    assert hash_iterations(m2.mqtt_users[user][1]) == 10000 and m2.hashes_computed == 1
    assert bcrypt_hash_cost(bcrypt_hashes(state, [user])[0][user]) == 11


def test_old_stretched_hashes_are_replaced_without_a_new_password(isolated_state: Path, tmp_path: Path) -> None:
    """A state from before the change (every hash at 10,000 iterations) keeps every password; each hash is
    recomputed once at the new cost and is valid for the same password."""
    platform, state, m = _materials(_spec(tmp_path, "hash_iterations: 10000"), isolated_state)
    assert all(hash_iterations(h) == 10000 for _, h in m.mqtt_users.values())
    _, _, after = _materials(_spec(tmp_path), isolated_state)
    assert {u: p for u, (p, _) in after.mqtt_users.items()} == {u: p for u, (p, _) in m.mqtt_users.items()}
    assert after.hashes_computed == len(m.mqtt_users)
    assert all(hash_iterations(h) == 1 and verify_mosquitto_hash(p, h) for p, h in after.mqtt_users.values())


@pytest.mark.integration
def test_mosquitto_accepts_old_and_new_hashes_side_by_side() -> None:
    """Mosquitto 2.0.11 reads the iteration count of each line: 1 and 10,000 in one file both work, and a
    wrong password is refused for either."""
    from support.mqttload import LoadPublisher
    from support.servers import Mosquitto

    m = Mosquitto.start(users={"old": "old-secret-0123456789abcdef"}, iterations=10000)
    try:
        lines = m.dir.joinpath("passwd").read_text().splitlines()
        lines.append("new:" + mosquitto_hash("new-secret-0123456789abcdef", 1))
        m.dir.joinpath("passwd").write_text("\n".join(lines) + "\n")
        m.restart()
        for user, pw, ok in (("old", "old-secret-0123456789abcdef", True), ("new", "new-secret-0123456789abcdef", True),
                             ("old", "new-secret-0123456789abcdef", False), ("new", "wrong-0123456789", False)):
            p = LoadPublisher(m.port, user, pw, client_id=user)
            try:
                p.connect(timeout=2)
                assert ok, user
            except ConnectionError:
                assert not ok, user
            finally:
                p.disconnect()
    finally:
        m.close()


@pytest.mark.integration
def test_nats_server_accepts_old_and_new_bcrypt_costs_side_by_side() -> None:
    """nats-server 2.9.10 reads the cost of each bcrypt hash: cost 4 and cost 11 users in one config."""
    from iotplat.nats.config import Permissions
    from support.natscluster import MqttProbe, NatsCluster

    perms = Permissions(publish=("x",))
    c = NatsCluster.start(1, devices=0, workers=0, extra_users={
        "cheap": ("cheap-secret-0123456789abcdef", perms, ("MQTT",)),
    })
    try:
        conf = c.nodes[0].conf.read_text()
        cheap = next(line for line in conf.splitlines() if '"cheap"' in line)
        stretched = bcrypt_hash("stretched-secret-0123456789abcdef", 11)
        old = cheap.replace('"cheap"', '"stretched"').split('password: "')[0] + f'password: "{stretched}"' + \
            cheap.split('password: "')[1].split('"', 1)[1]
        c.nodes[0].conf.write_text(conf.replace(cheap, cheap + "\n" + old))
        c.nodes[0].stop()
        c.nodes[0].launch()
        c.wait_ready()
        for user, pw, want in (("cheap", "cheap-secret-0123456789abcdef", 0),
                               ("stretched", "stretched-secret-0123456789abcdef", 0),
                               ("stretched", "cheap-secret-0123456789abcdef", "refused")):
            p = MqttProbe(c.nodes[0].mqtt_port, user, pw, c.ca_file, client_id=f"{user}-probe")
            try:
                code = p.wait_connack(30)
                assert (code == 0) if want == 0 else (code not in (0, None)), (user, code)
            finally:
                p.close()
    finally:
        c.close()
