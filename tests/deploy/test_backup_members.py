"""Which archive members `restore` demands comes from the services (Service.restore_members, checked by
backup.check_fits with the platform known): Mosquitto's mosquitto.db, nothing from the broker on nats, whose
`backup` instead waits until the worker acknowledged what the stream held (verify.nats_cluster.unacked_through)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from iotplat.deploy.backup import RESTORE_MEMBERS, check_fits
from iotplat.errors import InvalidInput
from iotplat.verify.nats_cluster import stream_last_seq, unacked_through
from tests.helpers import EXAMPLES, PLATFORM_DIR

DIGEST = "0" * 64


def _info(p, members: tuple[str, ...]) -> dict:
    return {"platform": p.name, "environment": p.environment,
            "influxdb": {"version": p.spec.influxdb.version, "database": p.influx_database},
            "members": {m: DIGEST for m in members}}


@pytest.fixture
def platforms(tmp_path: Path):
    from iotplat.spec.load import load_platform

    for f in (EXAMPLES / "cluster").iterdir():
        shutil.copy(f, tmp_path / f.name)
    return load_platform(PLATFORM_DIR / "platform.yaml"), load_platform(tmp_path / "platform.yaml")


def test_the_services_say_what_restore_needs(platforms) -> None:
    from iotplat.services import placed

    mosquitto, nats = platforms
    assert RESTORE_MEMBERS == ("state.tar", "influxdb.tar")
    assert {s.name: s.restore_members(mosquitto) for s in placed(mosquitto)}["broker"] == ("mosquitto.db",)
    assert all(s.restore_members(nats) == () for s in placed(nats))
    check_fits(_info(mosquitto, ("state.tar", "influxdb.tar", "mosquitto.db")), mosquitto)
    with pytest.raises(InvalidInput, match="no mosquitto.db member, which the broker service"):
        check_fits(_info(mosquitto, ("state.tar", "influxdb.tar")), mosquitto)  # e.g. an archive of a nats platform
    check_fits(_info(nats, ("state.tar", "influxdb.tar")), nats)  # a nats archive can be restored
    check_fits(_info(nats, ("state.tar", "influxdb.tar", "mosquitto.db")), nats)  # (the extra member is ignored)


def _jsz(last_seq: int, *consumers: dict) -> dict:
    """The shape of nats-server 2.9's /jsz?accounts=true&streams=true&consumers=true (fields this code reads)."""
    return {"account_details": [{"name": "IOTPLAT", "stream_detail": [
        {"name": "$MQTT_sess", "state": {"last_seq": 7}},
        {"name": "$MQTT_msgs", "state": {"messages": last_seq, "last_seq": last_seq},
         "consumer_detail": list(consumers)}]}]}


def _consumer(name: str, floor: int, delivered: int, ack_pending: int, pending: int) -> dict:
    return {"name": name, "ack_floor": {"consumer_seq": floor, "stream_seq": floor},
            "delivered": {"consumer_seq": delivered, "stream_seq": delivered},
            "num_ack_pending": ack_pending, "num_pending": pending, "num_redelivered": 0}


@pytest.mark.parametrize("consumer, done", [
    (_consumer("iotplat_0123456789ab", 100, 100, 0, 0), True),      # everything acknowledged
    (_consumer("iotplat_0123456789ab", 120, 130, 10, 5), True),     # beyond the mark under continuing load
    (_consumer("iotplat_0123456789ab", 90, 100, 10, 0), False),     # delivered, not all acknowledged yet
    (_consumer("iotplat_0123456789ab", 60, 80, 0, 20), False),      # not all delivered yet
    (_consumer("iotplat_0123456789ab", 95, 95, 0, 0), True),        # filtered: 96-100 are not the worker's subjects
    (_consumer("iotplat_0123456789ab", 95, 102, 7, 0), False),      # an unacked one may be <= 100
])
def test_unacked_through(consumer: dict, done: bool) -> None:
    jsz = _jsz(100, consumer, _consumer("other-consumer", 0, 0, 0, 100))  # MQTT's own consumers do not count
    assert stream_last_seq(jsz) == 100
    left = unacked_through(jsz, 100)
    assert (left == []) is done, left
    if not done:
        assert left[0].startswith("iotplat_0123456789ab: acknowledged through")


def test_unacked_through_without_a_worker_consumer_or_stream() -> None:
    assert unacked_through(_jsz(5), 5) == ["$MQTT_msgs: no worker consumer (iotplat_*) yet"]
    assert unacked_through({"account_details": []}, 5)[0].endswith("does not hold the stream")
    assert stream_last_seq({"account_details": []}) is None
