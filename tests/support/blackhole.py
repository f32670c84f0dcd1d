"""A TCP proxy on loopback that can go silent the way a host cut off the network does.

Until ``cut()`` it forwards bytes both ways (TLS passes through untouched). After ``cut()`` it forwards
nothing, closes nothing and reads nothing: the client's writes pile up in its socket buffers, its reads wait,
and no FIN or RST ever arrives, as when a firewall drops every packet of a host. New connections are no longer
accepted either (the kernel completes up to the listen backlog, then nothing answers), so a client that
dials it again waits for its own connect or handshake timeout. ``close()`` ends everything.

It stands in, at the network boundary, for tests/nats/test_cluster_e2e.py test_06's nftables cut of a
whole host, for one client's connection only: the real worker and the real nats-server run on both sides.
"""

from __future__ import annotations

import select
import socket
import threading


class BlackholeProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.cut_event = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        threading.Thread(target=self._accept, name=f"blackhole-{self.port}", daemon=True).start()

    def open_connections(self) -> int:
        """Connections forwarded now (both ends open)."""
        with self.lock:
            return sum(1 for a, b in self.pairs if a.fileno() >= 0 and b.fileno() >= 0)

    def cut(self) -> None:
        self.cut_event.set()

    def close(self) -> None:
        self.closed.set()
        self.cut_event.set()
        for s in [self.lsock] + [s for pair in self.pairs for s in pair]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        self.lsock.settimeout(0.2)
        while not self.closed.is_set() and not self.cut_event.is_set():
            try:
                client, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)  # blocking sends; the pumps wait for data with select()
            with self.lock:
                self.pairs.append((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.cut_event.is_set():  # silent: nothing read, nothing sent, nothing closed
                self.closed.wait(0.2)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.2)
                if not ready:
                    continue
                data = src.recv(65536)
            except (OSError, ValueError):  # closed under us (ValueError: select on a closed socket)
                data = b""
            if not data:
                if not self.cut_event.is_set():
                    for s in (src, dst):
                        try:
                            s.close()
                        except OSError:
                            pass
                return
            if self.cut_event.is_set():
                continue  # read just before the cut: dropped, as on the wire
            try:
                dst.sendall(data)
            except OSError:
                return
