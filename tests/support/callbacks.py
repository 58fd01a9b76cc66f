"""A completion-callback receiver for tests: records what MAOF POSTs to it."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CallbackReceiver:
    """Answers with the scripted statuses, then 200; `received` holds (headers, body)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/maof"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Tarpit:
    """A receiver that takes every connection (the kernel's backlog does) and never
    answers: each request to it lasts until the sender gives up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/hooks"

    def stop(self) -> None:
        self.listener.close()


class TricklingServer:
    """A server (an agent, a callback receiver, an agent's /health) that answers its first
    request with some bytes at once and the rest a byte every 0.2 s. `pace`: "head" (the
    status line and headers paced), "body" (its body), "chunked" (one chunk's size line,
    64 KB long), "tls" (a 16 KB TLS handshake record, to the client's hello)."""

    PACED = {
        "head": (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"x" * 4096),
        "body": (b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n", b"x" * 4096),
        "chunked": (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"0" * 65000 + b"2\r\n{}\r\n0\r\n\r\n",
        ),
        "tls": (b"", b"\x16\x03\x03\x40\x00" + b"\x02" * 16384),
    }

    def __init__(self, pace: str) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.pace, self.stop = pace, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        at_once, paced = self.PACED[self.pace]
        with conn:
            conn.recv(65536)
            conn.sendall(at_once)
            for byte in paced:
                if self.stop.wait(0.2):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client hung up
