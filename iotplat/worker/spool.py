"""The on-disk spool: an append-only, fsync'd, bounded queue of line-protocol batches.

Layout: ``<dir>/<20-digit number>.seg`` segment files, each a sequence of records
``[u32 length][u32 crc32][body]`` (big endian; body = lines joined by ``\\n``), and a ``cursor`` file
(``<segment> <offset>``) telling how far the drain has got. Records are appended and fdatasync'd
before ``append`` returns, so a batch whose messages are acknowledged to the broker survives a crash
or power loss. A torn record at the tail (a crash during ``append``, i.e. before the ack) is cut off at
start-up. Draining is strictly in order; a drained segment is deleted. ``append`` refuses (returns
False) when the spool would exceed ``max_bytes``: the caller stops acknowledging (backpressure).

After a crash the cursor may lag the last record actually written to InfluxDB by a few records:
those are written again, which InfluxDB absorbs (same series and timestamp = same row).
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

_HDR = struct.Struct(">II")
_SEG_RE = re.compile(r"^(\d{20})\.seg$")


class SpoolError(Exception):
    pass


@dataclass
class SpoolBatch:
    """Records read for draining; pass to ``commit`` once written."""

    body: bytes          # lines joined by b"\n"
    lines: int
    records: int
    end: tuple[int, int]  # (segment, offset) just past the last record


class Spool:
    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, segment_bytes: int,
                 log=None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.log = log
        self._lock = threading.Lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
        except OSError as e:
            raise SpoolError(f"cannot create spool directory {self.dir}: {e.strerror}") from None
        if not os.access(self.dir, os.W_OK):
            raise SpoolError(f"spool directory {self.dir} is not writable")
        self._sizes: dict[int, int] = {}
        self._records_pending = 0  # records appended and not yet committed (approximate after restart)
        self._recover()
        self._wfd: int | None = None
        self._wseg = max(self._sizes) if self._sizes else self._rseg

    # -- start-up ------------------------------------------------------------------------------
    def _recover(self) -> None:
        segs = sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _SEG_RE.match(p.name)))
        cur_seg, cur_off = self._read_cursor()
        for seg in segs:
            path = self._path(seg)
            if seg < cur_seg:
                path.unlink(missing_ok=True)
                continue
            good, count = self._scan(path, cur_off if seg == cur_seg else 0)
            size = path.stat().st_size
            if good < size:
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
                if self.log:
                    self.log.warning("spool_truncated", segment=path.name, kept=good, dropped_bytes=size - good)
            self._sizes[seg] = good
            self._records_pending += count
        if self._sizes and cur_seg not in self._sizes:
            cur_seg, cur_off = min(self._sizes), 0
        # Nothing pending: keep numbering from the cursor's segment (a full drain leaves it ahead of the
        # last segment), so new records are never below the cursor, which the next start would delete.
        self._rseg, self._roff = (cur_seg, cur_off) if self._sizes else (cur_seg, 0)
        if not self._sizes and cur_off:
            self._write_cursor()  # a drain interrupted before its cursor write: restart the segment at 0
        self._fsync_dir()

    def _scan(self, path: Path, start: int) -> tuple[int, int]:
        """Offset just past the last whole, valid record (from ``start``), and the record count."""
        count = 0
        with open(path, "rb") as f:
            data = f.read()
        off = 0
        while off + _HDR.size <= len(data):
            n, crc = _HDR.unpack_from(data, off)
            end = off + _HDR.size + n
            if end > len(data) or zlib.crc32(data[off + _HDR.size:end]) != crc:
                break
            if off >= start:
                count += 1
            off = end
        return off, count

    def _read_cursor(self) -> tuple[int, int]:
        try:
            seg, off = (self.dir / "cursor").read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return 0, 0

    def _write_cursor(self) -> None:
        tmp = self.dir / "cursor.tmp"
        tmp.write_text(f"{self._rseg} {self._roff}\n")
        os.replace(tmp, self.dir / "cursor")

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}.seg"

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- state ---------------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes not yet drained (disk use is at most this plus one partly drained segment)."""
        return sum(self._sizes.values()) - (self._roff if self._rseg in self._sizes else 0)

    @property
    def disk_bytes(self) -> int:
        return sum(self._sizes.values())

    @property
    def pending_records(self) -> int:
        return self._records_pending

    def empty(self) -> bool:
        return self._records_pending == 0

    # -- writing -------------------------------------------------------------------------------
    def append(self, lines: list[bytes]) -> bool:
        """Durably append one batch. False (nothing written) if it would exceed ``max_bytes``."""
        body = b"\n".join(lines)
        rec = _HDR.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            if self._records_pending > 0 and self.bytes + len(rec) > self.max_bytes:
                return False
            cur = self._sizes.get(self._wseg, 0)
            if self._wfd is None or (cur > 0 and cur + len(rec) > self.segment_bytes):
                if self._wfd is not None:
                    os.close(self._wfd)
                    self._wfd = None
                if self._wseg in self._sizes and self._sizes[self._wseg] > 0:
                    self._wseg += 1
                fresh = self._wseg not in self._sizes
                self._wfd = os.open(self._path(self._wseg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._sizes.setdefault(self._wseg, 0)
                if fresh:
                    self._fsync_dir()
                if not self._records_pending:
                    self._rseg, self._roff = self._wseg, self._sizes[self._wseg]
            view = memoryview(rec)
            while view:
                n = os.write(self._wfd, view)
                view = view[n:]
            os.fdatasync(self._wfd)
            self._sizes[self._wseg] += len(rec)
            self._records_pending += 1
        return True

    # -- draining ------------------------------------------------------------------------------
    def read(self, max_bytes: int = 8 << 20, max_lines: int = 50_000) -> SpoolBatch | None:
        """The oldest records (at least one, up to the limits), or None if the spool is empty."""
        with self._lock:
            if not self._records_pending:
                return None
            seg, off = self._rseg, self._roff
            limit = dict(self._sizes)
        bodies: list[bytes] = []
        lines = size = 0
        while seg in limit and size < max_bytes and lines < max_lines:
            if off >= limit[seg]:
                nxt = [s for s in limit if s > seg]
                if not nxt:
                    break
                seg, off = min(nxt), 0
                continue
            with open(self._path(seg), "rb") as f:
                f.seek(off)
                while off < limit[seg] and size < max_bytes and lines < max_lines:
                    hdr = f.read(_HDR.size)
                    if len(hdr) < _HDR.size:
                        raise SpoolError(f"spool segment {self._path(seg).name} is truncated at {off}")
                    n, crc = _HDR.unpack(hdr)
                    body = f.read(n)
                    if len(body) != n or zlib.crc32(body) != crc:
                        raise SpoolError(f"spool segment {self._path(seg).name} is corrupt at {off}")
                    bodies.append(body)
                    lines += body.count(b"\n") + 1
                    size += n
                    off += _HDR.size + n
        if not bodies:
            return None
        return SpoolBatch(b"\n".join(bodies), lines, len(bodies), (seg, off))

    def commit(self, batch: SpoolBatch) -> None:
        """Mark everything up to ``batch.end`` as written; delete fully drained segments."""
        seg, off = batch.end
        with self._lock:
            for s in [s for s in self._sizes if s < seg]:
                self._path(s).unlink(missing_ok=True)
                del self._sizes[s]
            self._rseg, self._roff = seg, off
            self._records_pending = max(0, self._records_pending - batch.records)
            if self._records_pending == 0:
                # everything drained: free the disk now, start a fresh segment on the next append
                if self._wfd is not None:
                    os.close(self._wfd)
                    self._wfd = None
                for s in list(self._sizes):
                    self._path(s).unlink(missing_ok=True)
                self._sizes.clear()
                self._wseg = max(self._wseg, seg) + 1
                self._rseg, self._roff = self._wseg, 0
            self._write_cursor()

    def close(self) -> None:
        with self._lock:
            if self._wfd is not None:
                os.close(self._wfd)
                self._wfd = None
