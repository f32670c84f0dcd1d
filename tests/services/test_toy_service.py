"""A new service is one module, one role and one template folder: the toy of tests/services/toy is installed as a
plugin (a dist-info in a temp dir that registers it under the entry-point group `iotplat.services`) and flows
through every layer with no edit to iotplat: the spec and its schema, render (its file, its paths in the one
table, its role in site.yml and destroy.yml, its port in the firewall, its data folder), Ansible (the plugin's role
found and syntax-checked), and on a throw-away local host `up`, `status` (its unit and health endpoint), `logs`,
`backup` and `restore` (its hooks).

iotplat runs in subprocesses with PYTHONPATH set to the temp dir, as it would with the plugin pip-installed: the
registry reads the entry points when iotplat starts, which this test process did long before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import PLATFORM_DIR, clear_leftover_instance

TOY = Path(__file__).resolve().parent / "toy"
NETWORK = "10.222.0.0/24"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy, installed into a temp dir the way pip would: its package, role and templates, and a dist-info
    whose entry_points.txt registers it."""
    site = tmp_path_factory.mktemp("toy-plugin")
    shutil.copytree(TOY, site, dirs_exist_ok=True)
    info = site / "iotplat_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: iotplat-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[iotplat.services]\ntoy = iotplat_toy:Toy\n")
    return site


def _env(work: Path, plugin: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTPLAT_", "ANSIBLE_"))}
    env.update(IOTPLAT_STATE_DIR=str(work / "state"), IOTPLAT_VAULT_PASSWORD_FILE=str(work / "vault-key"))
    if plugin is not None:
        env["PYTHONPATH"] = str(plugin)
    return env


def cli(work: Path, plugin: Path | None, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """`iotplat ARGS` in a fresh process (the plugin's entry point is read at start)."""
    return subprocess.run([sys.executable, "-c", "import sys; from iotplat.cli import main; sys.exit(main(sys.argv[1:]))",
                           *args], env=_env(work, plugin), capture_output=True, text=True, timeout=timeout, cwd=work)


def py(work: Path, plugin: Path, code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(work, plugin), capture_output=True, text=True,
                          timeout=300, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _spec(work: Path, name: str, network: str | None = None) -> Path:
    """The default spec with the toy on its one host (Grafana off: it cannot be installed here)."""
    spec = yaml.safe_load((PLATFORM_DIR / "platform.yaml").read_text())
    spec["name"] = name
    spec["hosts"][0]["services"].append("toy")
    spec["grafana"] = {"enabled": False}
    if network:
        spec["target"]["network"] = network
    spec_dir = work / "spec"
    spec_dir.mkdir()
    shutil.copy(PLATFORM_DIR / "devices.csv", spec_dir / "devices.csv")
    (spec_dir / "platform.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    key = work / "vault-key"
    key.write_text(f"{name}-toy-vault-password-0123456789abcdef")
    key.chmod(0o600)
    return spec_dir / "platform.yaml"


def test_the_spec_knows_the_toy_only_with_the_plugin(plugin: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "toyspec")
    without = cli(tmp_path, None, "validate", str(spec))
    assert without.returncode == 2, without.stdout + without.stderr
    assert "toy" in without.stderr and "platform.yaml" in without.stderr
    with_it = cli(tmp_path, plugin, "validate", str(spec))
    assert with_it.returncode == 0, with_it.stdout + with_it.stderr
    schema = json.loads(cli(tmp_path, plugin, "schema").stdout)
    assert "toy" in json.dumps(schema["$defs"]) and "toy" not in cli(tmp_path, None, "schema").stdout
    helptext = cli(tmp_path, plugin, "logs", "--help").stdout
    assert "toy" in helptext


def test_render_carries_the_toy_through_every_file(plugin: Path, tmp_path: Path) -> None:
    spec = _spec(tmp_path, "toyrender")
    build = tmp_path / "build"
    r = cli(tmp_path, plugin, "render", str(spec), "--out", str(build))
    assert r.returncode == 0, r.stderr
    # its file, rendered from its own template folder, at its path of the one table
    conf = (build / "hosts/core/etc/iotplat-toy/toy.toml").read_text()
    assert 'platform = "toyrender/default"' in conf and "health_port = 18088" in conf
    assert 'data = "/var/lib/iotplat-toy"' in conf
    manifest = json.loads((build / "manifest.json").read_text())
    assert any(f["host"] == "core" and f["dest"] == "/etc/iotplat-toy/toy.toml" and f["service"] == "toy"
               for f in manifest["files"]), manifest["files"]
    group_vars = yaml.safe_load((build / "ansible/group_vars/all.yml").read_text())
    assert group_vars["iotplat_paths"]["toy_conf"] == "/etc/iotplat-toy/toy.toml"
    assert group_vars["toy_health_port"] == 18088
    assert group_vars["iotplat_service_hosts"]["toy"] == ["core"]
    inventory = yaml.safe_load((build / "ansible/inventory.yml").read_text())
    assert "core" in inventory["all"]["children"]["toy"]["hosts"]
    core = inventory["all"]["hosts"]["core"]
    assert "/var/lib/iotplat-toy" in [d["path"] for d in core["iotplat_data_dirs"]]
    assert "toy" in core["iotplat_services"]
    assert any(rule["port"] == 18089 and rule["source"] == "admin" for rule in core["iotplat_ingress"]), core
    # the role in site.yml (after InfluxDB, before Grafana: deploy_order 35) and its uninstall in destroy.yml
    site = yaml.safe_load((build / "ansible/site.yml").read_text())[0]["tasks"]
    roles = [t["ansible.builtin.include_role"]["name"] for t in site]
    assert roles.index("influxdb") < roles.index("toy") < roles.index("grafana"), roles
    destroy = yaml.safe_load((build / "ansible/destroy.yml").read_text())[0]["tasks"]
    uninstall = [(t["ansible.builtin.include_role"]["name"], t["ansible.builtin.include_role"]["tasks_from"]) for t in destroy]
    assert ("toy", "uninstall") in uninstall and uninstall[-1] == ("common", "uninstall")
    # Ansible finds the plugin's role through iotplat's roles path, and both playbooks parse
    roles_path = py(tmp_path, plugin, "from iotplat.services import roles_path; print(roles_path())").strip()
    assert str(plugin / "roles") in roles_path.split(os.pathsep)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_ROLES_PATH=roles_path, ANSIBLE_CONFIG=str(build / "ansible/ansible.cfg"))
    playbook = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or "ansible-playbook"
    for book in ("site.yml", "destroy.yml"):
        check = subprocess.run([playbook, "--syntax-check", "-i", str(build / "ansible/inventory.yml"),
                                str(build / "ansible" / book)], env=env, capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture(scope="module")
def deployed(plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn"):
        pytest.skip("needs root and systemd-nspawn (apt-get install systemd-container)")
    work = tmp_path_factory.mktemp("toy-up")
    spec = _spec(work, "toyup", NETWORK)
    clear_leftover_instance("toyup-default")
    ctx = {"work": work, "spec": str(spec), "build": str(work / "build")}
    try:
        yield ctx
    finally:
        cli(work, plugin, "destroy", str(spec), "--out", ctx["build"], "--yes", "--data")


def _on_host(ctx: dict, plugin: Path, script: str) -> str:
    """A shell script as root on the platform's host (through iotplat's own local provider)."""
    return py(ctx["work"], plugin, (
        "import sys; from pathlib import Path\n"
        "from iotplat.deploy.targets import local_settings\nfrom iotplat.hosts import local_provider\n"
        "from iotplat.spec.load import load_platform\n"
        "hosts = local_provider(local_settings(load_platform(Path(sys.argv[1]), None)))\n"
        "r = hosts.exec('core', ['sh', '-c', sys.argv[2]], timeout=60)\n"
        "assert r.returncode == 0, r.stderr\nprint(r.stdout, end='')\n"), ctx["spec"], script)


@pytest.mark.hosts
@pytest.mark.slow
def test_toy_is_deployed_checked_logged_backed_up_and_restored(deployed: dict, plugin: Path) -> None:
    work, spec, build = deployed["work"], deployed["spec"], deployed["build"]
    up = cli(work, plugin, "up", spec, "--out", build, "--json")
    assert up.returncode == 0, up.stderr[-4000:]
    checks = {(c["host"], c["name"]): c for c in json.loads(up.stdout)["status"]}
    assert checks[("core", "unit iotplat-toy.service")]["ok"], checks
    assert checks[("core", "toy /healthz")]["ok"], checks
    assert checks[("core", "canary")]["ok"], checks
    assert _on_host(deployed, plugin, "cat /etc/iotplat-toy/toy.toml").startswith("# ")
    # logs: the toy's unit is one of the host's, by its service name
    logs = cli(work, plugin, "logs", spec, "--out", build, "--service", "toy", "--lines", "50", "--json")
    assert logs.returncode == 0, logs.stderr
    entries = [json.loads(line) for line in logs.stdout.splitlines() if line.strip()]
    assert entries and {e["service"] for e in entries} == {"toy"}, logs.stdout[-2000:]
    # backup: its hook's member is in the archive; restore puts it back
    _on_host(deployed, plugin, "echo 41 > /var/lib/iotplat-toy/counter")
    backup = cli(work, plugin, "backup", spec, "--out", build, "--to", str(work / "backups"), "--json")
    assert backup.returncode == 0, backup.stderr[-3000:]
    archive = Path(json.loads(backup.stdout)["archive"])
    members = py(work, plugin, "import sys, json; from pathlib import Path; from iotplat.deploy.backup import open_archive\n"
                 "info, members = open_archive(Path(sys.argv[1])); print(json.dumps({k: v.decode(errors='replace') "
                 "for k, v in members.items() if k.startswith('toy/')}))", str(archive))
    assert json.loads(members) == {"toy/counter": "41\n"}
    _on_host(deployed, plugin, "echo 7 > /var/lib/iotplat-toy/counter")
    restore = cli(work, plugin, "restore", spec, "--out", build, "--from", str(archive), "--yes", "--json")
    assert restore.returncode == 0, restore.stderr[-3000:]
    assert _on_host(deployed, plugin, "cat /var/lib/iotplat-toy/counter") == "41\n"
