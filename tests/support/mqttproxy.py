"""A TCP proxy between an MQTT client and the broker that records the packets both ways.

Used to check from the wire what a client sends: that PUBACKs follow the order of the PUBLISHes
(MQTT 3.1.1 4.6 / MQTT 5 4.6), how many are in flight, and to cut connections on purpose.
Plain TCP only (TLS is checked separately against the broker itself).
"""

from __future__ import annotations

import socket
import threading
import time


class MqttSniffer:
    def __init__(self, upstream_port: int, v5: bool) -> None:
        self.upstream = upstream_port
        self.v5 = v5
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.events: list[tuple[float, str, int, int]] = []  # (time, "publish"/"puback", pid, conn no)
        self.lock = threading.Lock()
        self.conns: list[tuple[socket.socket, socket.socket]] = []
        self.nconn = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                c.close()
                continue
            self.nconn += 1
            n = self.nconn
            self.conns.append((c, u))
            threading.Thread(target=self._pump, args=(c, u, "c2s", n), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, "s2c", n), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, n: int) -> None:
        buf = b""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            buf += data
            buf = self._parse(buf, direction, n)
            try:
                dst.sendall(data)
            except OSError:
                return

    def _parse(self, buf: bytes, direction: str, n: int) -> bytes:
        i = 0
        while i + 2 <= len(buf):
            first = buf[i]
            j, mult, length = i + 1, 1, 0
            while True:
                if j >= len(buf):
                    return buf[i:]
                b = buf[j]
                j += 1
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            end = j + length
            if end > len(buf):
                break
            t = first >> 4
            now = time.monotonic()
            if direction == "s2c" and t == 3 and (first >> 1) & 3:
                tl = (buf[j] << 8) | buf[j + 1]
                pid = (buf[j + 2 + tl] << 8) | buf[j + 3 + tl]
                with self.lock:
                    self.events.append((now, "publish", pid, n))
            elif direction == "c2s" and t == 4:
                pid = (buf[j] << 8) | buf[j + 1]
                with self.lock:
                    self.events.append((now, "puback", pid, n))
            i = end
        return buf[i:]

    def cut(self) -> None:
        """Break every current connection (as a network failure would)."""
        for c, u in self.conns:
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
        self.conns.clear()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.lsock.close()
