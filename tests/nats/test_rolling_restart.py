"""The nats role's restart (roles/nats/templates/iotplat-nats-restart.j2), run as rendered against a real 3-node
nats-server 2.9.10 cluster on loopback.

The stand-in: a `systemctl` test double first on PATH. It records its arguments, then waits until the test has
restarted the loopback node (nats-server as the test's own process, not a systemd unit), as `systemctl restart`
returns once the unit was restarted. What this proves: the script waits for the whole cluster before it restarts
its node, refuses to restart while another node is away, and returns only once its node has its routes back and
JetStream is current with the meta leader; a node outside a cluster (a first deploy) is restarted at once. What it cannot prove: systemd's own restart, and `throttle: 1` holding
the other nodes of a play (tests/nats/test_cluster_e2e.py runs the role on hosts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest

from support.natscluster import NatsCluster

ROLE = Path(__file__).resolve().parents[2] / "roles" / "nats"

DOUBLE = """#!{python}
import os, sys, time
d = os.environ["DOUBLE_DIR"]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
for _ in range(600):  # at most 60 s
    if os.path.exists(os.path.join(d, "restarted")):
        sys.exit(0)
    time.sleep(0.1)
sys.exit(1)
"""


@pytest.fixture(scope="module")
def cluster():
    c = NatsCluster.start(size=3, devices=1, workers=1)
    yield c
    c.close()


@pytest.fixture
def script(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    text = jinja2.Template((ROLE / "templates" / "iotplat-nats-restart.j2").read_text()).render(
        ansible_managed="rendered by tests/nats/test_rolling_restart.py")
    path = tmp_path / "iotplat-nats-restart"
    path.write_text(text)
    path.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(DOUBLE.format(python=sys.executable))
    (bindir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DOUBLE_DIR": str(tmp_path)}
    return path, env


def _whole(node) -> bool:
    try:
        return node.monitor("/routez")["num_routes"] >= 2 and node.monitor("/healthz?js-server-only=true")[
            "status"] == "ok"
    except OSError:
        return False


def test_a_whole_cluster_restarts_the_node_and_returns_once_it_is_back(cluster: NatsCluster, script, tmp_path) -> None:
    path, env = script
    n1 = cluster.node("n1")
    started_before = n1.monitor("/varz")["start"]
    proc = subprocess.Popen([str(path), f"http://127.0.0.1:{n1.http_port}", "2", "60", "10"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "calls").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert (tmp_path / "calls").read_text() == "restart nats-server.service\n"
        n1.stop()  # what systemd does: stop, then start
        n1.launch(wait=False)
        (tmp_path / "restarted").touch()
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "back in" in out, out
    assert _whole(n1), "the script returned before its node was back in the cluster"  # checked from outside
    assert n1.monitor("/varz")["start"] != started_before


def test_a_node_is_not_restarted_while_another_is_away(cluster: NatsCluster, script, tmp_path) -> None:
    path, env = script
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    cluster.wait_ready()
    n2.stop()
    try:
        r = subprocess.run([str(path), f"http://127.0.0.1:{n1.http_port}", "2", "60", "3"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "not restarting nats-server: the cluster is not whole after 3 s" in r.stderr, r.stderr
        assert "1 of 2 routes" in r.stderr or "JetStream" in r.stderr, r.stderr
        assert not (tmp_path / "calls").exists(), "systemctl was called"
    finally:
        n2.launch()
        cluster.wait_ready()


def test_a_node_without_a_cluster_is_restarted_at_once(script, tmp_path) -> None:
    """Debian's configuration (no cluster) before iotplat's first: every node of a first deploy must start the
    cluster configuration without waiting for the others, which could never be whole before it."""
    path, env = script
    single = NatsCluster.start(size=1, devices=1, workers=1)
    try:
        (tmp_path / "restarted").touch()  # the double returns at once
        r = subprocess.run([str(path), f"http://127.0.0.1:{single.nodes[0].http_port}", "2", "5", "5"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "not in a cluster: not waited for" in r.stdout, r.stdout
        assert (tmp_path / "calls").read_text() == "restart nats-server.service\n"
    finally:
        single.close()


def test_bad_arguments_exit_2_with_the_usage(script) -> None:
    path, env = script
    r = subprocess.run([str(path), "http://127.0.0.1:1", "two"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage: iotplat-nats-restart" in r.stderr, r.stderr
