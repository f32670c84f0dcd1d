"""A minimal MQTT 3.1.1 / 5 client for the worker's one job: consume QoS 1 with manual, in-order acks.

Why our own: paho-mqtt's per-packet Python code costs about 33 µs per received message (measured in
this project), which caps a paho-based worker near 30k msg/s even when it does nothing else, below the
target of 0.6 x Mosquitto's QoS 1 pass-through on this machine. This client parses every PUBLISH in a
64 KiB read with a tight loop, sends the PUBACKs of a whole batch as one write, and stops *reading*
(instead of blocking a callback) while the in-flight window is full, so keepalive PINGs and PUBACKs keep
flowing under backpressure. It implements only what the worker uses: CONNECT (persistent session,
MQTT 5 Session Expiry + Receive Maximum), SUBSCRIBE (QoS 1), incoming PUBLISH QoS 0/1, outgoing QoS 1
PUBLISH (dead letters, not re-sent after a reconnect: their durable copy is in InfluxDB), PINGREQ,
DISCONNECT, TLS (verifying ``server_name`` or the host), reconnect with jittered exponential backoff.
The same conformance tests (tests/worker/test_transport_conformance.py) run against it and paho.

All socket I/O happens on one thread (an SSL object must not be read and written concurrently);
other threads hand it bytes through a queue and wake it with a socket pair.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable

from .config import MqttConfig
from .transport import Handler, tls_context

_CONNACK_V3 = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
               4: "bad user name or password", 5: "not authorized"}
_CONNACK_V5 = {0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
               0x84: "unsupported protocol version", 0x85: "client identifier not valid",
               0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
               0x89: "server busy", 0x8A: "banned", 0x8C: "bad authentication method",
               0x95: "packet too large", 0x97: "quota exceeded", 0x9F: "connection rate exceeded"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def publish_packet(topic: str | bytes, payload: bytes, pid: int, *, v5: bool = False,
                   dup: bool = False) -> bytes:
    """A QoS 1 PUBLISH (v5: with an empty property list; ``dup``: the DUP flag of a re-sent message)."""
    body = _utf8(topic) + struct.pack(">H", pid) + (b"\x00" if v5 else b"") + payload
    return bytes([0x3A if dup else 0x32]) + _varint(len(body)) + body


def _skip_properties(buf: bytes, k: int) -> int:
    """MQTT 5: the index just past the property list at ``buf[k]`` (a varint length, then that many bytes)."""
    plen = 0
    mult = 1
    while True:
        b = buf[k]
        k += 1
        plen += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult <<= 7
    return k + plen


class ProtocolError(Exception):
    pass


_HEAD = struct.Struct(">BBH").unpack_from  # first byte, first length byte, a PUBLISH's topic length
_U16 = struct.Struct(">H").unpack_from


def _remaining_length(buf: bytes, j: int, n: int) -> tuple[int, int]:
    """The remaining length starting at ``buf[j]`` and the index after it; (0, -1) if ``buf`` ends first."""
    mult = 1
    length = 0
    while True:
        if j >= n:
            return 0, -1
        b = buf[j]
        length += (b & 0x7F) * mult
        j += 1
        if not b & 0x80:
            return length, j
        mult <<= 7
        if mult > 128 ** 3:
            raise ProtocolError("malformed remaining length")


class _TlsLink:
    """TLS through memory BIOs over the plain (non-blocking) socket.

    Why not ``SSLContext.wrap_socket``: Mosquitto writes every MQTT packet as a TLS record of its own, and
    an SSL socket reads one record per ``recv()`` through two ``read()`` system calls (header, then body):
    two system calls and one Python-level call per message. Here one ``recv()`` takes in whatever the
    kernel holds (hundreds of records) and ``decrypt`` turns every whole record in it into plaintext;
    ``encrypt`` turns a whole batch of PUBACKs into records at once. Certificate and host name checks
    are the context's, exactly as with ``wrap_socket`` (``server_hostname``).
    """

    def __init__(self, ctx: ssl.SSLContext, raw: socket.socket, server_hostname: str) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.closed = False

    def handshake(self) -> None:
        """The handshake over the (still blocking) socket."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = self.outgoing.read()
                if out:
                    self.raw.sendall(out)
                data = self.raw.recv(1 << 16)
                if not data:
                    raise ProtocolError("connection closed by the broker during the TLS handshake") from None
                self.incoming.write(data)
        out = self.outgoing.read()
        if out:
            self.raw.sendall(out)

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)  # a memory BIO takes it all
        return self.outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext of every whole record received so far (b"" if none is whole yet). After the
        broker's close_notify, ``closed`` is True (the plaintext before it is still returned)."""
        self.incoming.write(data)
        size = len(data) + (1 << 15)  # plaintext <= ciphertext, plus at most one record left over before
        out = bytearray(size)
        view = memoryview(out)
        total = 0
        read = self.obj.read
        try:
            while True:
                if size - total < (1 << 14):  # room for one more whole record
                    view.release()
                    out.extend(bytes(size))
                    size *= 2
                    view = memoryview(out)
                k = read(size - total, view[total:])
                if not k:
                    self.closed = True
                    break
                total += k
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        finally:
            view.release()
        return bytes(out[:total])


class NativeTransport:
    name = "native"

    def __init__(self, cfg: MqttConfig, handler: Handler,
                 can_receive: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self.v5 = cfg.protocol == 5
        self.can_receive = can_receive or getattr(handler, "can_receive", None) or (lambda: True)
        # a handler with on_publishes() + room() takes every PUBLISH of a read in one call (the worker);
        # others get on_message() per message
        self._on_publishes: Callable[[list[bytes], list[bytes], list[int | None], int], None] | None = \
            getattr(handler, "on_publishes", None)
        self._room: Callable[[], int] | None = getattr(handler, "room", None)
        if self._room is None:
            self._on_publishes = None
        self.gen = 0
        self._out: list[bytes] = []
        self._out_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._tls: _TlsLink | None = None
        self._leftover = b""
        self._next_pid = 1
        self._pending_pub: set[int] = set()
        self._sub_pid = 0
        self._ctx = tls_context(cfg) if cfg.tls else None
        self.connected = False
        self.coalesce_below = 16384
        self.coalesce_wait = 0.001

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="iotplat-mqtt", daemon=True)
        self._thread.start()

    def subscribe(self, filters: list[str]) -> None:
        self._sub_pid = self._alloc_pid()
        body = bytearray(struct.pack(">H", self._sub_pid))
        if self.v5:
            body += b"\x00"  # no properties
        for f in filters:
            body += _utf8(f) + b"\x01"  # QoS 1 (v5: no-local=0, retain-as-published=0, retain handling 0)
        self._send(bytes([0x82]) + _varint(len(body)) + bytes(body))

    def ack(self, tokens: list[Any]) -> None:
        """PUBACK every token of the current connection, in the given order, as one write.

        A token is ``gen << 16 | packet id`` (``gen`` counts connections); None is a QoS 0 message."""
        with self._out_lock:
            # checked under the lock _connect holds while it bumps ``gen`` and clears the queue: a PUBACK
            # for a message of an earlier connection can never reach the next one (the broker may have
            # given that packet id to another message by then)
            gen = self.gen
            acks = [0x40020000 | (t & 0xFFFF) for t in tokens if t is not None and t >> 16 == gen]
            if acks:  # each PUBACK is 4 bytes: 0x40, remaining length 2, packet id
                self._out.append(struct.pack(f">{len(acks)}I", *acks))
        if acks:
            self.wake()

    def publish(self, topic: str, payload: bytes) -> None:
        pid = self._alloc_pid()
        packet = publish_packet(topic, payload, pid, v5=self.v5)
        self._pending_pub.add(pid)
        self._send(packet)

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def stop(self, timeout: float = 5.0) -> None:
        self._send(b"\xe0\x00")  # DISCONNECT (after every queued PUBACK)
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ internals
    def _alloc_pid(self) -> int:
        with self._out_lock:
            pid = self._next_pid
            self._next_pid = 1 if pid >= 65535 else pid + 1
            return pid

    def _send(self, data: bytes) -> None:
        with self._out_lock:
            self._out.append(data)
        self.wake()

    def _run(self) -> None:
        delay = self.cfg.reconnect_min
        while not self._stop.is_set():
            try:
                self._connect()
            except (OSError, ProtocolError, ssl.SSLError) as e:
                self._close()
                self.handler.on_connect_failed(str(e)[:200] or type(e).__name__)
                self._stop.wait(random.uniform(delay / 2, delay))
                delay = min(self.cfg.reconnect_max, delay * 2)
                continue
            delay = self.cfg.reconnect_min
            reason = "connection closed"
            try:
                self._loop()
                reason = "client disconnect"
            except (OSError, ProtocolError, ssl.SSLError) as e:
                reason = str(e)[:200] or type(e).__name__
            except Exception as e:  # a malformed packet we did not foresee: drop the connection, not the thread
                reason = f"internal error: {type(e).__name__}: {e}"[:200]
            self._close()
            self.handler.on_disconnected(reason)
            if not self._stop.is_set():
                self._stop.wait(random.uniform(self.cfg.reconnect_min / 2, self.cfg.reconnect_min))

    def _close(self) -> None:
        self.connected = False
        self._tls = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _connect(self) -> None:
        c = self.cfg
        raw = socket.create_connection((c.host, c.port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock = raw
        self._tls = None
        if self._ctx is not None:
            self._tls = _TlsLink(self._ctx, raw, c.server_name or c.host)
            self._tls.handshake()
        flags = 0x00  # clean start / clean session = 0: a persistent session
        if c.username:
            flags |= 0x80
            if c.password is not None:
                flags |= 0x40
        var = _utf8("MQTT") + bytes([5 if self.v5 else 4, flags]) + struct.pack(">H", c.keepalive)
        if self.v5:
            props = b"\x11" + struct.pack(">I", c.session_expiry) + b"\x21" + struct.pack(">H", c.inflight)
            var += _varint(len(props)) + props
        payload = _utf8(c.client_id)
        if c.username:
            payload += _utf8(c.username)
            if c.password is not None:
                payload += _utf8(c.password)
        body = var + payload
        # a fresh connection: drop PUBACKs meant for the old one (their messages come again) and
        # refuse any more of them from now on
        with self._out_lock:
            self.gen += 1
            self._out.clear()
            self._pending_pub.clear()
        packet = bytes([0x10]) + _varint(len(body)) + body
        raw.sendall(self._tls.encrypt(packet) if self._tls is not None else packet)
        first, data, self._leftover = self._read_packet_blocking()
        if first >> 4 != 2:
            raise ProtocolError(f"expected CONNACK, got packet type {first >> 4}")
        session_present = bool(data[0] & 1)
        code = data[1]
        if code != 0:
            names = _CONNACK_V5 if self.v5 else _CONNACK_V3
            raise ProtocolError(f"broker refused the connection: {names.get(code, hex(code))}")
        raw.settimeout(None)
        raw.setblocking(False)
        self.connected = True
        self.handler.on_connected(session_present)

    def _read_packet_blocking(self) -> tuple[int, bytes, bytes]:
        """The first packet (CONNACK) as (first byte, body) and whatever arrived after it (a persistent
        session's queued messages may follow at once): the loop starts with that."""
        assert self._sock is not None
        buf = b""
        while True:
            if len(buf) >= 2:
                length, j = _remaining_length(buf, 1, len(buf))
                if j > 0 and len(buf) >= j + length:
                    return buf[0], buf[j:j + length], buf[j + length:]
            data = self._sock.recv(1 << 16)
            if not data or self._tls is not None and self._tls.closed:
                raise ProtocolError("connection closed by the broker during CONNECT")
            buf += self._tls.decrypt(data) if self._tls is not None else data

    def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        ka = self.cfg.keepalive
        last_sent = last_recv = time.monotonic()
        ping_out = False
        buf = self._leftover
        outbuf = b""  # bytes for the wire (encrypted already with TLS)
        link = self._tls
        on_message = self.handler.on_message
        can_receive = self.can_receive
        gen = self.gen
        v5 = self.v5
        if self._on_publishes is not None:
            batch_dispatch = self._dispatch_batch

            def dispatch(b: bytes, _m: Callable[..., None], _c: Callable[[], bool], g: int, v: bool) -> bytes:
                return batch_dispatch(b, g, v)
        else:
            dispatch = self._dispatch
        while True:
            with self._out_lock:
                if self._out:
                    data = b"".join(self._out)
                    self._out.clear()
                    outbuf += link.encrypt(data) if link is not None else data
            stopping = self._stop.is_set()
            if stopping and not outbuf:
                return
            want_read = can_receive() and not stopping
            if buf and want_read:
                buf = dispatch(buf, on_message, can_receive, gen, v5)
                want_read = can_receive()
            rl = [self._wake_r, sock] if want_read else [self._wake_r]
            now = time.monotonic()
            timeout = max(0.0, min(1.0, ka - (now - last_sent)))
            r, w, _ = select.select(rl, [sock] if outbuf else [], [], timeout)
            if self._wake_r in r:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if outbuf and w:
                try:
                    n = sock.send(outbuf[:1 << 20])
                    outbuf = outbuf[n:]
                    last_sent = time.monotonic()
                except BlockingIOError:
                    pass
            if sock in r and want_read:
                # read what is there, until a short read (the kernel had no more) or 512 KiB
                chunks: list[bytes] = []
                total = 0
                eof = False
                while total < (1 << 19):
                    try:
                        chunk = sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    if not chunk:
                        eof = True
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                    if len(chunk) < (1 << 16):
                        break
                if chunks:
                    last_recv = time.monotonic()
                    ping_out = False
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    if link is not None:
                        data = link.decrypt(data)  # every whole TLS record in it; a partial one waits
                    if data:
                        buf = dispatch(buf + data if buf else data, on_message, can_receive, gen, v5)
                if eof:
                    raise ProtocolError("connection closed by the broker")
                if link is not None and link.closed:
                    raise ProtocolError("TLS connection closed by the broker (close_notify)")
                if 0 < total < self.coalesce_below:
                    # A small read: the broker sends faster than one packet per wake-up but slower
                    # than we read. Waiting a moment lets packets queue up, so each wake-up (select,
                    # recv, locks) is shared by many messages instead of one or two: about a third of
                    # the CPU per message at high rates, for at most 1 ms more latency.
                    time.sleep(self.coalesce_wait)
            now = time.monotonic()
            if now - last_sent >= ka and not outbuf:
                outbuf += link.encrypt(b"\xc0\x00") if link is not None else b"\xc0\x00"  # PINGREQ
                ping_out = True
            if ping_out and now - last_recv > ka * 1.5:
                raise ProtocolError("keepalive timeout: no answer from the broker")
            if not want_read and now - last_recv > ka * 1.5 and not ping_out:
                last_recv = now  # we are not reading (backpressure): don't mistake that for a dead broker

    def _dispatch(self, buf: bytes, on_message: Callable[..., None], can_receive: Callable[[], bool], gen: int,
                  v5: bool) -> bytes:
        """Handle every whole packet in ``buf`` (stopping early when the window is full); return the rest."""
        i = 0
        n = len(buf)
        while i < n:
            if i + 2 > n:
                break
            first = buf[i]
            # remaining length (1..4 bytes)
            j = i + 1
            mult = 1
            length = 0
            while True:
                if j >= n:
                    return buf[i:]
                b = buf[j]
                length += (b & 0x7F) * mult
                j += 1
                if not b & 0x80:
                    break
                mult <<= 7
                if mult > 128 ** 3:
                    raise ProtocolError("malformed remaining length")
            end = j + length
            if end > n:
                break
            ptype = first >> 4
            if ptype == 3:  # PUBLISH
                if not can_receive():
                    break
                qos = (first >> 1) & 3
                tl = (buf[j] << 8) | buf[j + 1]
                k = j + 2 + tl
                topic = buf[j + 2:k].decode("utf-8", "surrogateescape")
                token = None
                if qos:
                    token = (gen << 16) | (buf[k] << 8) | buf[k + 1]
                    k += 2
                if v5:
                    k = _skip_properties(buf, k)
                on_message(topic, buf[k:end], bool(first & 0x08), token)
            else:
                self._control(ptype, buf, j, end, v5)
            i = end
        return buf[i:] if i < n else b""

    def _control(self, ptype: int, buf: bytes, j: int, end: int, v5: bool) -> None:
        """A packet other than PUBLISH whose body is ``buf[j:end]``."""
        if ptype == 4:  # PUBACK for our dead-letter publishes
            self._pending_pub.discard((buf[j] << 8) | buf[j + 1])
        elif ptype == 9:  # SUBACK
            k = j + 2
            if v5:
                k = _skip_properties(buf, k)
            self.handler.on_subscribed(list(buf[k:end]))
        elif ptype == 13:  # PINGRESP
            pass
        elif ptype == 14:  # DISCONNECT from the broker (v5)
            code = buf[j] if end > j else 0
            raise ProtocolError(f"broker sent DISCONNECT (reason 0x{code:02x})")
        else:
            raise ProtocolError(f"unexpected packet type {ptype}")

    def _dispatch_batch(self, buf: bytes, gen: int, v5: bool) -> bytes:
        """``_dispatch`` for a handler with ``on_publishes``: the PUBLISHes of ``buf`` (at most ``room()``
        of them) go to the handler as one call, with the topics as bytes. Control packets are handled
        where they are, after the PUBLISHes before them were delivered, so the handler sees the order of
        the wire. Returns the unparsed rest of ``buf``."""
        on_publishes = self._on_publishes
        assert on_publishes is not None and self._room is not None
        room = self._room()
        topics: list[bytes] = []
        payloads: list[bytes] = []
        tokens: list[int | None] = []
        add_topic, add_payload, add_token = topics.append, payloads.append, tokens.append
        dups = 0
        g = gen << 16
        i = 0
        n = len(buf)
        while i + 2 <= n:
            if i + 4 <= n:
                first, length, tl = _HEAD(buf, i)  # type, remaining length (if < 128), a PUBLISH's topic length
            else:  # a 2- or 3-byte packet at the end (PINGRESP, DISCONNECT)
                first, length, tl = buf[i], buf[i + 1], 0
            j = i + 2
            if length & 0x80:  # a remaining length of 2..4 bytes
                length, j = _remaining_length(buf, i + 1, n)
                if j < 0:
                    break  # not all of it has arrived yet
                if first >> 4 == 3 and j + 2 <= n:
                    tl = _U16(buf, j)[0]
            end = j + length
            if end > n:
                break
            if first >> 4 == 3:  # PUBLISH
                if len(topics) >= room:
                    break
                k = j + 2 + tl
                add_topic(buf[j + 2:k])
                if first & 0x06:  # QoS 1
                    add_token(g | _U16(buf, k)[0])
                    k += 2
                else:
                    add_token(None)
                if v5:
                    k = k + 1 if buf[k] == 0 else _skip_properties(buf, k)
                add_payload(buf[k:end])
                if first & 0x08:
                    dups += 1
            else:
                if topics:
                    on_publishes(topics, payloads, tokens, dups)
                    room -= len(topics)
                    topics, payloads, tokens, dups = [], [], [], 0
                    add_topic, add_payload, add_token = topics.append, payloads.append, tokens.append
                self._control(first >> 4, buf, j, end, v5)
            i = end
        if topics:
            on_publishes(topics, payloads, tokens, dups)
        return buf[i:] if i < n else b""
