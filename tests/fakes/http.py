"""Shared plumbing for the fake outside servers (Ollama, OpenAI).

The fakes are *real* HTTP/1.1 servers on loopback, so the official clients
talk to them over real sockets exactly as in production: keep-alive
connections, chunked transfer encoding, abrupt disconnects.

* ``TCP_NODELAY`` on every accepted socket: a reply takes several ``send()``
  calls (headers, body, one per streamed chunk) and with Nagle on, a small
  write waits for the client's delayed ACK: ~40 ms per response, which would
  swamp any latency benchmark run against the fakes.
* Each streamed chunk is written (flushed) on its own, so tokens arrive live.
* ``stop()`` closes the listener *and* every open connection (a pooled
  keep-alive connection must not keep talking to a "down" server);
  ``start()`` binds the same port again, i.e. the server crashed and came back.
"""
from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Recorded", "FakeServer", "FakeHandler", "dumps", "split_tokens"]


def dumps(obj: Any) -> str:
    """Compact JSON, as Go's encoder (Ollama) and OpenAI's servers write it."""
    return json.dumps(obj, separators=(",", ":"))


@dataclass(frozen=True)
class Recorded:
    """One request as it arrived: ``time.time()``, method, path (no query
    string), JSON body (``None`` when empty or not a JSON object) and headers
    (names lower-cased)."""

    at: float
    method: str
    path: str
    body: dict | None
    headers: dict = field(default_factory=dict)


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into whitespace-separated tokens that keep their spaces
    (``"a b"`` -> ``["a", " b"]``), so ``"".join(split_tokens(t)) == t``."""
    tokens = re.findall(r"\s*\S+(?:\s+$)?", text)
    return tokens if tokens else ([text] if text else [])


class Abort(Exception):
    """Raised by a fake's handler to drop the connection abruptly."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A burst of connections (hundreds of streams, a batch) must not overflow
    # the listen backlog (socketserver's default: 5), which a real server
    # sizes far larger: a refused SYN is retried after 1 s, past the
    # clients' connect timeout in the tests.
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        # A client hanging up (e.g. openai closes right after ``[DONE]``) is normal.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def __init__(self, address, handler, fake: "FakeServer"):
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        with self.conn_lock:
            conns, self.connections = list(self.connections), set()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class FakeHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler: parses the request, records it on the fake, then
    calls ``fake.handle(self)``.  Offers reply helpers to the fake."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.conn_lock:
            self.server.connections.add(self.request)
        super().setup()

    def finish(self) -> None:
        with self.server.conn_lock:
            self.server.connections.discard(self.request)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _dispatch(self) -> None:
        arrived = time.time()
        self.started = False  # True once a status line has been sent
        length = int(self.headers.get("Content-Length") or 0)  # both clients send it
        raw = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        self.body: dict | None = parsed if isinstance(parsed, dict) else None
        split = urlsplit(self.path)
        self.route, self.query = split.path, split.query
        fake = self.server.fake
        with fake._rec_lock:  # recorded on arrival, before any reply
            fake._requests.append(Recorded(arrived, self.command, self.route, self.body,
                                           {k.lower(): v for k, v in self.headers.items()}))
        try:
            fake.handle(self)
        except Abort:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        except Exception:  # a bug in a fake: report it, answer 500 if possible
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self.started:
                self.send_json(500, {"error": "fake server crashed"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _head(self, status: int, headers: dict) -> None:
        self.started = True
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def send_json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self.send_body(status, dumps(obj).encode(), "application/json; charset=utf-8", headers)

    def send_body(self, status: int, data: bytes, content_type: str,
                  headers: dict | None = None) -> None:
        self._head(status, {"Content-Type": content_type, "Content-Length": str(len(data)),
                            **(headers or {})})
        self.wfile.write(data)

    def start_chunked(self, status: int, content_type: str, headers: dict | None = None) -> None:
        """Send the status line and headers of a ``Transfer-Encoding: chunked`` reply."""
        self._head(status, {"Content-Type": content_type, "Transfer-Encoding": "chunked",
                            **(headers or {})})

    def send_chunk(self, data: bytes | str) -> None:
        """Write one chunk in a single ``send`` (flushed immediately)."""
        if isinstance(data, str):
            data = data.encode()
        if data:  # an empty chunk would terminate the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def end_chunked(self, last: bytes | str = b"") -> None:
        """End the body; ``last`` (a final chunk) goes out in the same ``send``
        as the terminator, so a client that stops reading at the last event
        already has the complete body and can reuse the connection."""
        if isinstance(last, str):
            last = last.encode()
        frame = b"%x\r\n%s\r\n" % (len(last), last) if last else b""
        self.wfile.write(frame + b"0\r\n\r\n")
        self.wfile.flush()

    def abort(self) -> None:
        """Drop the connection now, mid-reply, without a proper end."""
        raise Abort()


class FakeServer:
    """Base of the fakes: lifecycle, request recording, interruptible sleep.

    ``url`` is ``http://127.0.0.1:PORT`` while running and ``None`` while
    stopped; ``port`` survives a ``stop()`` so ``start()`` rebinds it.
    Subclasses implement ``handle(self, h: FakeHandler)``.
    """

    handler_class = FakeHandler

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.url: str | None = None
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._life_lock = threading.RLock()
        self._rec_lock = threading.Lock()
        self._requests: list[Recorded] = []

    def start(self) -> "FakeServer":
        """Bind (the same port as before, after a ``stop()``) and serve in a thread."""
        with self._life_lock:
            if self._httpd is not None:
                return self
            self._stopping.clear()
            self._httpd = _HTTPServer((self.host, self.port), self.handler_class, self)
            self.port = self._httpd.server_address[1]
            self.url = f"http://{self.host}:{self.port}"
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"{type(self).__name__}:{self.port}", daemon=True)
            self._thread.start()
            return self

    def stop(self) -> None:
        """Go down: stop accepting, drop open connections, wake sleeping handlers."""
        with self._life_lock:  # a concurrent start() waits until the port is free
            httpd, self._httpd = self._httpd, None
            if httpd is None:
                return
            self.url = None  # None while down; ``self.port`` is kept for start()
            httpd.shutdown()
            httpd.server_close()
            self._stopping.set()
            httpd.close_connections()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def sleep(self, seconds: float) -> None:
        """Sleep in a handler; a ``stop()`` cuts it short and drops the connection."""
        if self._stopping.wait(seconds if seconds and seconds > 0 else 0):
            raise Abort()

    @property
    def requests(self) -> list[Recorded]:
        """Snapshot (a copy, safe to iterate) of every request, in arrival order."""
        with self._rec_lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def clear(self) -> None:
        """Forget the recorded requests (configuration and state are kept)."""
        with self._rec_lock:
            self._requests.clear()

    def handle(self, h: FakeHandler) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
