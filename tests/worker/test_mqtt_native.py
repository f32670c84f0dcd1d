"""The native MQTT client's own parts that the conformance tests (real broker) cannot drive to their edges:
TLS records split anywhere across reads, and the batch dispatcher's framing and window."""

from __future__ import annotations

import random
import socket
import ssl
import threading

import pytest
from support.servers import make_ca

from iotplat.worker.config import MqttConfig
from iotplat.worker.mqtt_native import NativeTransport, _TlsLink, _varint, publish_packet


def test_tls_link_decrypts_records_split_anywhere(tmp_path):
    """A real TLS 1.3 server (the stdlib's, with a throw-away CA) writes 5,000 small records, one per
    message, as Mosquitto does; the client side is fed the ciphertext in random slices (a record cut in
    the middle, many records at once) and must return exactly the plaintext, in order, with the certificate
    and host name verified. Then the server closes with close_notify: a ProtocolError, not silence."""
    ca = make_ca(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca["cert"], ca["key"])
    client_ctx = ssl.create_default_context(cafile=str(ca["ca"]))
    a, b = socket.socketpair()
    msgs = [b"message %05d " % i + b"x" * (i % 200) for i in range(5000)]

    def server() -> None:
        s = server_ctx.wrap_socket(b, server_side=True)
        for m in msgs:
            s.sendall(m)
        try:
            s.unwrap()  # sends close_notify; the client never answers it
        except (ssl.SSLError, OSError):
            pass
        s.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    link = _TlsLink(client_ctx, a, "localhost")
    link.handshake()
    rnd = random.Random(7)
    got = b""
    while not link.closed:
        data = a.recv(rnd.choice([1, 7, 100, 4096, 65536]))
        assert data, "EOF before close_notify"
        got += link.decrypt(data)
    t.join(10)
    a.close()
    assert got == b"".join(msgs)


def test_tls_link_refuses_a_wrong_host_name(tmp_path):
    ca = make_ca(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(ca["cert"], ca["key"])
    a, b = socket.socketpair()

    def server() -> None:
        try:
            server_ctx.wrap_socket(b, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        b.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    link = _TlsLink(ssl.create_default_context(cafile=str(ca["ca"])), a, "not-the-broker.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        link.handshake()
    a.close()
    t.join(10)


class _Sink:
    def __init__(self, room: int) -> None:
        self.left = room
        self.got: list[tuple[bytes, bytes, int | None]] = []
        self.dups = 0

    def room(self) -> int:
        return self.left

    def on_publishes(self, topics, payloads, tokens, dups) -> None:
        assert len(topics) <= self.left
        self.left -= len(topics)
        self.got += list(zip(topics, payloads, tokens))
        self.dups += dups

    def on_message(self, *a) -> None:  # pragma: no cover - the batch path must be used
        raise AssertionError("on_message called although on_publishes exists")

    def on_subscribed(self, granted) -> None:
        self.got.append((b"SUBACK", bytes(granted), None))


def _transport(sink, v5=True) -> NativeTransport:
    cfg = MqttConfig("127.0.0.1", 1, 5 if v5 else 4, "tcp", False, "", "", "u", "p", "u", 30, 3600, "", 100,
                     0.2, 2.0)
    return NativeTransport(cfg, sink)


@pytest.mark.parametrize("v5", [True, False])
def test_batch_dispatch_framing_window_and_split_packets(v5):
    """Packets of every size (1- to 3-byte remaining lengths), cut at every possible byte across two
    reads, QoS 0 and 1, DUP flags, a SUBACK in between: the handler gets each PUBLISH once, in order,
    never more than room() per call, and the unparsed rest is returned."""
    payloads = [b"", b"x", b"y" * 126, b"z" * 200, b"w" * 20_000]
    wire = b""
    expect: list[tuple[bytes, bytes, int | None]] = []
    for i, p in enumerate(payloads * 3):
        topic = f"t/{i}".encode()
        if i % 5 == 3:  # QoS 0: no packet id
            body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if v5 else b"") + p
            pkt = bytes([0x30 | (0x08 if i % 2 else 0)]) + _varint(len(body)) + body
        else:
            pkt = publish_packet(topic, p, 1000 + i, v5=v5, dup=bool(i % 2))
        wire += pkt
        expect.append((topic, p, None if i % 5 == 3 else 1000 + i))
        if i == 6:  # a SUBACK between PUBLISHes: delivered in wire order
            body = b"\x00\x01" + (b"\x00" if v5 else b"") + b"\x01"
            wire += b"\x90" + _varint(len(body)) + body
            expect.append((b"SUBACK", b"\x01", None))
    for cut in list(range(0, 40)) + list(range(len(wire) - 40, len(wire) + 1)) + [len(wire) // 2]:
        sink = _Sink(room=10_000)
        t = _transport(sink, v5)
        gen = t.gen
        rest = t._dispatch_batch(wire[:cut], gen, v5)
        rest = t._dispatch_batch(rest + wire[cut:], gen, v5)
        assert rest == b""
        assert [(tp, p, None if tok is None else tok & 0xFFFF) for tp, p, tok in sink.got] == expect
        assert all(tok is None or tok >> 16 == gen for _, _, tok in sink.got)
        assert sink.dups == sum(1 for i in range(len(payloads) * 3) if i % 2)
    # the window: with room for 4, 4 are taken and the rest is handed back untouched
    sink = _Sink(room=4)
    t = _transport(sink, v5)
    rest = t._dispatch_batch(wire, t.gen, v5)
    assert len(sink.got) == 4 and rest and wire.endswith(rest)
    assert wire[: len(wire) - len(rest)].count(b"t/") == 4  # stopped right after the 4th PUBLISH
