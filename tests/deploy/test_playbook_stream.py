"""The ansible-playbook runner's streaming and deadline (iotplat.deploy.ansible._stream).

ansible-playbook is replaced by a small shell script that prints what the default callback prints; the
runner's parsing and process handling are what is under test, and they do not depend on Ansible itself
(the real invocation is covered by tests/roles and tests/deploy/test_up_local.py).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from iotplat.deploy.ansible import Masker, _stream
from iotplat.errors import IotplatError


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "fake-ansible-playbook"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return [str(path)]


def test_a_silent_hang_is_stopped_at_the_deadline_and_names_the_task(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    argv = _script(tmp_path, f"""echo 'TASK [common : Install | Base packages] ***'
sleep 120 &
echo $! > {pidfile}
wait
""")
    started = time.monotonic()
    with pytest.raises(IotplatError) as err:
        _stream(argv, dict(os.environ), Masker(set()), None, timeout=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"the deadline was not enforced while output was read ({elapsed:.1f}s)"
    assert "did not finish within 2s" in str(err.value)
    assert "'common : Install | Base packages'" in str(err.value)
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], (
        "the playbook's children outlived the deadline")


def test_output_is_parsed_and_masked(tmp_path: Path) -> None:
    argv = _script(tmp_path, """cat <<'OUT'
TASK [mosquitto : Configure | Password file] ***
changed: [edge]
TASK [influxdb : Service | Wait] ***
fatal: [tsdb]: FAILED! => {"msg": "password hunter2-not-so-secret refused"}

PLAY RECAP *********************************************************************
edge                       : ok=10   changed=1    unreachable=0    failed=0    skipped=2    rescued=0    ignored=0
tsdb                       : ok=4    changed=0    unreachable=0    failed=1    skipped=0    rescued=0    ignored=0
OUT
exit 2
""")
    result = _stream(argv, dict(os.environ), Masker({"hunter2-not-so-secret"}), None, timeout=30)
    assert result.returncode == 2
    assert result.changed_tasks == [("edge", "mosquitto : Configure | Password file")]
    assert len(result.failures) == 1 and result.failures[0].startswith("tsdb: influxdb : Service | Wait: ")
    assert "hunter2" not in result.output and "hunter2" not in result.failures[0]
    assert (result.recap["edge"].ok, result.recap["edge"].changed) == (10, 1)
    assert result.recap["tsdb"].failed == 1


def test_a_failure_is_named_by_its_msg_and_a_long_one_keeps_its_end() -> None:
    """The reason is Ansible's `msg` (and the command's stderr), not the JSON around it: a role's own failure
    message puts the broker's log lines last, and a cut at the JSON's length lost them (CI, stop 19: the
    reason ended in "Stopped mosquitto.servi")."""
    from iotplat.deploy.ansible import FAILURE_REASON_CHARS, failure_reason

    journal = " | ".join(["Stopping mosquitto.service - Mosquitto MQTT Broker..."] * 6 + ["Error: Address in use."])
    line = 'fatal: [core]: FAILED! => ' + json.dumps({"changed": False, "msg": f"Mosquitto did not start. Broker log: {journal}"})
    assert len(line.split("=>", 1)[1]) > 400
    assert failure_reason(line).endswith("Error: Address in use.")
    cmd = 'fatal: [core]: FAILED! => ' + json.dumps({"changed": True, "rc": 1, "msg": "non-zero return code",
                                                     "stderr": "nft: syntax error"})
    assert failure_reason(cmd) == "non-zero return code (stderr: nft: syntax error)"
    assert failure_reason("fatal: [core]: UNREACHABLE! => not json") == "not json"
    assert len(failure_reason('failed: [x] => ' + json.dumps({"msg": "m" * 5000}))) == FAILURE_REASON_CHARS


def test_parse_recap_reads_every_count_and_only_the_recap() -> None:
    """The one PLAY RECAP parser (the runner above and tests/roles' PlaybookRun both use it)."""
    from iotplat.deploy.ansible import parse_recap

    output = """TASK [x] ***
edge                       : ok=99   changed=99
PLAY RECAP *********************************************************************
edge                       : ok=10   changed=1    unreachable=0    failed=0    skipped=2    rescued=3    ignored=4
tsdb.iotplat.internal      : ok=4    changed=0    unreachable=1    failed=1    skipped=0    rescued=0    ignored=0
"""
    assert parse_recap(output) == {
        "edge": {"ok": 10, "changed": 1, "unreachable": 0, "failed": 0, "skipped": 2, "rescued": 3, "ignored": 4},
        "tsdb.iotplat.internal": {"ok": 4, "changed": 0, "unreachable": 1, "failed": 1, "skipped": 0, "rescued": 0,
                                  "ignored": 0},
    }
    assert parse_recap("PLAY [all] ***\nno recap here\n") == {}
