"""Fault injection at the network edge of REAL servers (no fake clients, nothing patched).

* :class:`CuttingTcpProxy` forwards bytes to a real server and calls ``on_cut`` (which
  stops that server) once ``cut_after_bytes`` of request data went through; afterwards
  every connection is accepted and closed at once (counted: the client's retries).
* :class:`CuttingHttpProxy` forwards HTTP requests one by one; right before (or after) the
  first request matching ``cut_on`` it stops answering and calls ``on_cut`` (which stops
  the server): the server dies exactly there.  ``restore()`` once it was started again.

The code under test talks to the proxy's URL exactly as it talks to the server.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class CuttingTcpProxy:
    def __init__(self, upstream_port: int, cut_after_bytes: int, on_cut: Callable[[], None]):
        self.upstream_port = upstream_port
        self.cut_after_bytes = cut_after_bytes
        self.on_cut = on_cut
        self.sent = 0
        self.cut = threading.Event()
        self.cut_done = threading.Event()
        self.refused_after_cut = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if self.cut.is_set():
                self.refused_after_cut += 1
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        except OSError:
            client.close()
            return
        done = threading.Event()

        def pump(src, dst, count: bool):
            trigger = False
            try:
                while not done.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    if count:
                        with self._lock:
                            self.sent += len(data)
                            trigger = self.sent >= self.cut_after_bytes and not self.cut.is_set()
                            if trigger:
                                self.cut.set()
                        if trigger or self.cut.is_set():
                            break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                done.set()
                for s in (client, upstream):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            if count and trigger:
                try:
                    self.on_cut()  # the in-flight request is torn; now the real server goes down
                finally:
                    self.cut_done.set()

        t = threading.Thread(target=pump, args=(upstream, client, False), daemon=True)
        t.start()
        pump(client, upstream, True)
        t.join(timeout=5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        self._sock.close()


class CuttingHttpProxy:
    """``cut_on(method, path) -> "before" | "after" | None``; after the cut the upstream is
    whatever ``on_cut`` left (a stopped server: every request fails to connect)."""

    def __init__(self, upstream_port: int, cut_on: Callable[[str, str], str | None], on_cut: Callable[[], None]):
        proxy = self
        self.upstream_port = upstream_port
        self.cut_on = cut_on
        self.on_cut = on_cut
        self.cut = threading.Event()
        self.down = threading.Event()
        self.cut_done = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self.failed_after_cut = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                where = None if proxy.cut.is_set() else proxy.cut_on(self.command, self.path)
                proxy.requests.append((self.command, self.path))
                if where == "before":
                    proxy._cut()
                if proxy.down.is_set():  # the server is going down / is down: no answer at all
                    proxy.failed_after_cut += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:
                    if proxy.cut.is_set():
                        proxy.failed_after_cut += 1
                    self.close_connection = True
                    self.connection.close()  # like a dead server: no answer at all
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if where == "after":
                    proxy._cut()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _cut(self) -> None:
        self.cut.set()
        self.down.set()

        def stop() -> None:
            try:
                self.on_cut()
            finally:
                self.cut_done.set()

        threading.Thread(target=stop, daemon=True).start()

    def restore(self) -> None:
        """The server is back (started again by the test): forward requests again."""
        self.down.clear()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
