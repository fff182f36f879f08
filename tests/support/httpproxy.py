"""A small HTTP proxy for tests: CONNECT tunnels and absolute-form forwarding, on loopback.

It stands for a corporate proxy (or a P2P distribution daemon that acts as one). It knows
host names the machine does not resolve: ``hosts`` maps such a name (for example
``registry.alsd.invalid``, which never resolves: ``.invalid`` is reserved) to a loopback
address, so a client can only reach that registry *through the proxy*, and a request that
arrives proves that the client used it. Connections to anything else are refused (502).

It records one :class:`ProxiedRequest` per CONNECT and per forwarded request line.
Threads, not asyncio: its clients are subprocesses (alsd), the tests are sync or async.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass

_HEAD_END = b"\r\n\r\n"
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n", re.M)


@dataclass(frozen=True)
class ProxiedRequest:
    method: str  # "CONNECT", "GET", ...
    target: str  # "host:port" for CONNECT, the absolute URL otherwise


class HttpProxy:
    def __init__(self, hosts: dict[str, tuple[str, int]]) -> None:
        self.hosts = hosts
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HttpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _record(self, method: str, target: str) -> None:
        with self._lock:
            self.requests.append(ProxiedRequest(method, target))

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _upstream(self, hostport: str) -> socket.socket | None:
        host, _, port = hostport.rpartition(":")
        target = self.hosts.get(host)
        if target is None or not port.isdigit() or int(port) != target[1]:
            return None
        up = socket.create_connection(target, timeout=30)
        up.settimeout(None)
        with self._lock:
            self._socks.append(up)
        return up

    def _serve(self, client: socket.socket) -> None:
        head = b""
        try:
            while _HEAD_END not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            m = _REQUEST_LINE.match(head)
            if m is None:
                client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            method, target = m[1].decode(), m[2].decode()
            if method == "CONNECT":
                self._record(method, target)
                up = self._upstream(target)
                if up is None:
                    client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    return
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head[head.index(_HEAD_END) + 4 :]
                if rest:
                    up.sendall(rest)
                self._pipe(client, up, record=False)
                return
            hostport = re.sub(r"^http://([^/]+).*$", r"\1", target)
            up = self._upstream(hostport)
            if up is None:
                self._record(method, target)
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            # The registry (Go's net/http) takes absolute-form request lines as they are;
            # every request on this connection goes to the same host (clients pool
            # proxied connections per target).
            self._record_lines(head)
            up.sendall(head)
            self._pipe(client, up, record=True)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _record_lines(self, data: bytes) -> None:
        for m in _REQUEST_LINE.finditer(data):
            self._record(m[1].decode(), m[2].decode())

    def _pipe(self, client: socket.socket, up: socket.socket, *, record: bool) -> None:
        def down() -> None:
            try:
                while data := up.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=down, daemon=True)
        t.start()
        try:
            while data := client.recv(65536):
                if record:
                    self._record_lines(data)
                up.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)
        t.join(timeout=60)
        with contextlib.suppress(OSError):
            up.close()
