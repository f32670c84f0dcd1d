"""The on-disk spool: order, bounds, crash recovery (torn tail), cursor, segment deletion."""

from __future__ import annotations

import os

from iotplat.worker.spool import Spool


def batch(i: int, n: int = 10) -> list[bytes]:
    return [b"m,b=%d v=%di %d" % (i, j, i * 1000 + j) for j in range(n)]


def drain(s: Spool, max_lines: int = 50_000) -> list[bytes]:
    out: list[bytes] = []
    while (b := s.read(max_lines=max_lines)) is not None:
        out.extend(b.body.split(b"\n"))
        s.commit(b)
    return out


def test_in_order_across_segments_and_deleted_when_drained(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    expected = []
    for i in range(100):
        assert s.append(batch(i))
        expected += batch(i)
    segs = [p for p in os.listdir(tmp_path) if p.endswith(".seg")]
    assert len(segs) > 3  # rolled over into several segments
    assert s.pending_records == 100
    assert drain(s, max_lines=37) == expected
    assert s.empty() and s.bytes == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".seg")]


def test_bounded_refuses_when_full_and_accepts_after_drain(tmp_path):
    s = Spool(tmp_path, max_bytes=8192, segment_bytes=4096)
    n = 0
    while s.append(batch(n)):
        n += 1
        assert n < 1000
    assert s.bytes <= 8192
    assert n > 5
    b = s.read(max_lines=30)  # three records drained free room for one more
    s.commit(b)
    assert s.append(batch(999))
    while s.append(batch(998)):
        pass
    assert s.bytes <= 8192


def test_survives_restart_and_cuts_torn_tail(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    for i in range(5):
        s.append(batch(i))
    b = s.read(max_lines=20)  # two records
    s.commit(b)
    s.close()
    seg = sorted(p for p in os.listdir(tmp_path) if p.endswith(".seg"))[-1]
    with open(tmp_path / seg, "ab") as f:  # a crash in the middle of an append (never acknowledged)
        f.write(b"\x00\x00\x01\x00garbage")
    s2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert s2.pending_records == 3
    assert drain(s2) == batch(2) + batch(3) + batch(4)
    s2.append(batch(7))
    s2.close()
    s3 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert drain(s3) == batch(7)


def test_corrupt_record_in_the_middle_is_cut_there(tmp_path):
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    for i in range(3):
        s.append(batch(i))
    s.close()
    seg = next(p for p in os.listdir(tmp_path) if p.endswith(".seg"))
    data = bytearray((tmp_path / seg).read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the last record: its CRC no longer matches
    (tmp_path / seg).write_bytes(bytes(data))
    s2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 20)
    assert drain(s2) == batch(0) + batch(1)


def test_records_spooled_after_a_drain_and_a_restart_survive_the_next_restart(tmp_path):
    """A full drain leaves the cursor ahead of segment 0; a process started on that empty spool must not write
    below the cursor, or the next start deletes those records as 'already drained' (found by `iotplat rotate
    secrets`: InfluxDB restarts, the spool drains, the worker restarts, InfluxDB refuses the old password)."""
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert s.append(batch(1))
    assert drain(s) == batch(1)
    s.close()
    s2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)  # restart on the empty spool
    assert s2.empty()
    assert s2.append(batch(2)) and s2.append(batch(3))
    s2.close()
    s3 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)  # restart with records pending
    assert s3.pending_records == 2
    assert drain(s3) == batch(2) + batch(3)
    s3.close()
    s4 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert s4.empty()


def test_cursor_left_inside_a_deleted_segment_does_not_hide_new_records(tmp_path):
    """A crash between deleting the drained segments and writing the cursor leaves `seg off>0` with no segment."""
    (tmp_path / "cursor").write_text("3 500\n")
    s = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert s.empty()
    assert s.append(batch(1))
    s.close()
    s2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert s2.pending_records == 1 and drain(s2) == batch(1)
