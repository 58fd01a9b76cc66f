"""A TCP server that answers every request with the same bytes (not necessarily HTTP)."""

from __future__ import annotations

import contextlib
import socket
import threading


def answering(reply: bytes) -> tuple[socket.socket, str]:
    """A server that reads each request (its head, and its body by Content-Length), writes
    `reply`, and closes; returns its listening socket (close it when done) and its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        request += conn.recv(65536)
                    head, _, body = request.partition(b"\r\n\r\n")
                    length = 0
                    if b"content-length:" in head.lower():
                        field = head.lower().split(b"content-length:")[1]
                        length = int(field.split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)  # then closed with nothing unread: no RST
                    while conn.recv(65536):
                        pass

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}/"
