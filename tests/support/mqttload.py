"""A small, fast, reliable QoS 1 load publisher (raw sockets, MQTT 3.1.1).

Why not mosquitto_pub/paho: ``mosquitto_pub -l`` exits before its QoS 1 queue drains, and paho as a
publisher reuses packet ids past 65,535 queued messages. This one keeps a bounded window of unacked
PUBLISHes (ids never collide), pipelines writes, survives broker restarts (reconnects with a persistent
session and re-sends every unacknowledged message with DUP set), and can pace itself to a rate.

The wire encoding (remaining length, length-prefixed strings, the PUBLISH packet) is the worker's own
(iotplat.worker.mqtt_native). That hides no worker bug from the tests: this publisher only ever talks
to a real Mosquitto, which checks every packet it gets, so a wrong encoder would make the broker refuse
this publisher as well. What the worker does not have stays here: the 3.1.1 CONNECT with a clean session
only on the first connect, the packet-id window, re-sending with DUP, and reading PUBACKs.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections import OrderedDict
from typing import Callable, Iterable, Iterator

from iotplat.worker.mqtt_native import _utf8, _varint, publish_packet


class LoadPublisher:
    def __init__(self, port: int, username: str, password: str, client_id: str = "loadgen",
                 ca_file: str | None = None, window: int = 2000, host: str = "127.0.0.1",
                 tls_name: str | None = None) -> None:
        assert 0 < window < 65000
        self.host, self.port = host, port
        self.tls_name = tls_name  # the name the server certificate must carry (default: host)
        self.username, self.password, self.client_id = username, password, client_id
        self.ca_file = ca_file
        self.window = window
        self.sock: socket.socket | None = None
        self.unacked: OrderedDict[int, bytes] = OrderedDict()   # pid -> packet
        self.next_pid = 1
        self.sent = 0
        self.acked = 0
        self.reconnects = 0
        self.first_session = True
        self.ack_times: dict[int, float] = {}

    # -- connection ----------------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._connect_once()
                return
            except (OSError, ConnectionError) as e:
                last = e
                self._close()
                time.sleep(0.2)
        raise ConnectionError(f"load publisher could not connect: {last}")

    def _connect_once(self) -> None:
        raw = socket.create_connection((self.host, self.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ca_file:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            raw = ctx.wrap_socket(raw, server_hostname=self.tls_name or self.host)
        flags = 0x80 | 0x40 | (0x02 if self.first_session else 0x00)  # user, password, clean session?
        var = _utf8("MQTT") + bytes([4, flags]) + struct.pack(">H", 60)
        payload = _utf8(self.client_id) + _utf8(self.username) + _utf8(self.password)
        body = var + payload
        raw.sendall(bytes([0x10]) + _varint(len(body)) + body)
        hdr = self._recv_exact(raw, 4)
        if hdr[0] != 0x20 or hdr[3] != 0:
            raise ConnectionError(f"CONNACK refused: {hdr!r}")
        raw.settimeout(None)
        raw.setblocking(False)
        self.sock = raw
        self.buf = b""
        self.first_session = False
        if self.unacked:  # resend everything not acknowledged, in order, with DUP
            self.reconnects += 1
            for pid, pkt in list(self.unacked.items()):
                dup = bytes([pkt[0] | 0x08]) + pkt[1:]
                self.unacked[pid] = dup
                self._send_blocking(dup)

    @staticmethod
    def _recv_exact(s: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed during CONNACK")
            data += chunk
        return data

    def _close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def _send_blocking(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            assert self.sock is not None
            try:
                n = self.sock.send(view)
                view = view[n:]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                select.select([], [self.sock], [], 1.0)

    def _pump_acks(self, wait: float) -> None:
        assert self.sock is not None
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r and not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf = self.buf + chunk
        i = 0
        now = time.monotonic()
        while len(buf) - i >= 4:
            if buf[i] == 0x40 and buf[i + 1] == 2:
                pid = (buf[i + 2] << 8) | buf[i + 3]
                if self.unacked.pop(pid, None) is not None:
                    self.acked += 1
                    if self.on_ack is not None:
                        self.on_ack(pid, now)
                i += 4
            elif buf[i] == 0xD0:  # PINGRESP
                i += 2
            else:
                raise ConnectionError(f"unexpected packet 0x{buf[i]:02x}")
        self.buf = buf[i:]

    on_ack: Callable[[int, float], None] | None = None

    # -- publishing ----------------------------------------------------------------------------
    def publish_all(self, messages: Iterable[tuple[str, bytes]], rate: float | None = None,
                    timeout: float = 300.0, on_sent: Callable[[int, int, float], None] | None = None) -> int:
        """Publish every message at QoS 1 and wait until each is acknowledged. Returns the count.

        ``rate`` messages/s paces the sends; ``on_sent(index, pid, t)`` is called per message."""
        if self.sock is None:
            self.connect()
        deadline = time.monotonic() + timeout
        it: Iterator[tuple[str, bytes]] = iter(messages)
        t0 = time.monotonic()
        count = 0
        done = False
        out: list[bytes] = []
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"publish timed out: {count} sent, {len(self.unacked)} unacked")
            try:
                if not done:
                    room = self.window - len(self.unacked)
                    if rate:
                        allowed = int((time.monotonic() - t0) * rate) - count
                        room = min(room, allowed)
                    for _ in range(max(0, min(room, 500))):
                        try:
                            topic, payload = next(it)
                        except StopIteration:
                            done = True
                            break
                        pid = self.next_pid
                        self.next_pid = 1 if pid >= 65535 else pid + 1
                        while self.next_pid in self.unacked:
                            self.next_pid = 1 if self.next_pid >= 65535 else self.next_pid + 1
                        pkt = publish_packet(topic.encode(), payload, pid)
                        self.unacked[pid] = pkt
                        out.append(pkt)
                        if on_sent is not None:
                            on_sent(count, pid, time.monotonic())
                        count += 1
                    if out:
                        self._send_blocking(b"".join(out))
                        self.sent += len(out)
                        out = []
                if done and not self.unacked:
                    return count
                full = len(self.unacked) >= self.window
                self._pump_acks(0.05 if (full or done or rate) else 0.0)
            except (OSError, ConnectionError, ssl.SSLError):
                out = []
                self._close()
                self.connect(timeout=max(1.0, deadline - time.monotonic()))

    def disconnect(self) -> None:
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.sendall(b"\xe0\x00")
            except OSError:
                pass
        self._close()
