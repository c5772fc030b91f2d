"""Fault injectors that sit between the pipeline and a source: a TCP proxy and an HTTP front.

`TcpProxy` forwards a loopback TCP port to a PostgreSQL server (TCP or unix socket) or to an HTTP
simulator, byte for byte. It can cut every open connection on command (`cut()`), or by itself the
moment the client sends a given byte string (`cut_when_client_sends(b"FETCH")`: the extract has
counted the window and starts reading rows). A cut closes both sides at once, the way a dropped
network link or a restarted pgbouncer looks to the client.

`HttpFront` is an HTTP server that passes requests on to an API simulator and lets a test replace
any answer: `front.rule = fn(call) -> Answer | None` sees every call (number, path, query) and
may answer it itself (a malformed body, an HTML page with 200, a 429 with a Retry-After date) or
edit the upstream body (a next cursor that never advances). `front.calls` lists what was asked,
when, and what was answered.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qsl, urlsplit


class TcpProxy:
    """127.0.0.1:<port> -> `upstream` ((host, port) or a unix socket path); a context manager."""

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self.upstream = upstream
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._trigger: bytes | None = None
        self._closed = False
        self.cuts = 0                 # connections cut so far
        self.connections = 0          # connections accepted so far
        self._thread = threading.Thread(target=self._accept, name=f"tcp proxy :{self.port}", daemon=True)

    # --- control -------------------------------------------------------------------------------

    def cut(self) -> int:
        """Close every open connection, both sides; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self.cuts += len(pairs)
        return len(pairs)

    def cut_when_client_sends(self, marker: bytes | None) -> None:
        """Cut every connection as soon as a client sends `marker` (once; None disarms)."""
        self._trigger = marker

    # --- plumbing ------------------------------------------------------------------------------

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.upstream)
        else:
            sock = socket.create_connection(self.upstream)
        return sock

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            marker = self._trigger
            if from_client and marker is not None and marker in data:
                self._trigger = None
                self.cut()
                return
            try:
                dst.sendall(data)
            except OSError:
                break
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def start(self) -> "TcpProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Call:
    number: int                      # 1-based, over the front's lifetime (or since reset())
    path: str
    query: dict[str, str]
    at: float                        # time.monotonic() when it arrived
    status: int | None = None        # what the front answered


@dataclass
class Answer:
    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


# rule(call) -> Answer (the front answers itself), a callable body -> body (edit the upstream JSON
# body of a 200), or None (pass through)
Rule = Callable[[Call], "Answer | Callable[[dict], dict] | None"]


class HttpFront:
    """An HTTP server in front of `upstream` (a base URL) whose answers a test may replace."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.rule: Rule | None = None
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                front._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"http front :{self.port}",
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
        self.rule = None

    def data_calls(self, path: str | None = None) -> list[Call]:
        return [c for c in self.calls if not c.path.startswith("/_admin") and (path is None or c.path == path)]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        import requests

        parts = urlsplit(handler.path)
        with self._lock:
            call = Call(len(self.calls) + 1, parts.path, dict(parse_qsl(parts.query)), time.monotonic())
            self.calls.append(call)
        decided = self.rule(call) if self.rule is not None else None
        if isinstance(decided, Answer):
            body = decided.body.encode() if isinstance(decided.body, str) else decided.body
            self._answer(handler, call, decided.status, body, {"Content-Type": decided.content_type,
                                                               **decided.headers})
            return
        upstream = requests.get(self.upstream + handler.path, timeout=30,
                                headers={k: v for k, v in handler.headers.items() if k.lower() != "host"})
        body = upstream.content
        if callable(decided) and upstream.status_code == 200:
            body = json.dumps(decided(upstream.json())).encode()
        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() in ("content-type", "retry-after", "www-authenticate", "link", "x-total-count")}
        self._answer(handler, call, upstream.status_code, body, headers)

    @staticmethod
    def _answer(handler, call: Call, status: int, body: bytes, headers: dict[str, str]) -> None:
        call.status = status
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self) -> "HttpFront":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
