"""A keep-alive HTTP/1.1 server that closes connections under a request, on a script.

The race the tiny clients must survive (a server closing an idle keep-alive
connection just as the client sends its next request on it) cannot be timed
against a real sidecar, so this server plays the server's side of it exactly:
it answers every request and keeps the connection, except the second
request on its first connection, which it handles as the script says:
``close`` (no byte of an answer) or ``partial`` (half a status line, then
close). Every answer is the sidecar's ``can`` (or ``check``) body. It is a
network fault injector; nothing of the sidecar's code is imitated beyond that.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

Second = Literal["close", "partial", "answer"]

ANSWER_BODY = b'{"allowed":true,"customerId":"c","module":"m","status":"active"}'
RESULTS_BODY = b'{"results":[{"customerId":"c","module":"m","allowed":true}]}'


class ClosingServer:
    def __init__(self, second: Second = "close") -> None:
        self.second = second
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        #: One entry per request received: (connection number, method and path).
        self.requests: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._connections = 0
        #: Requests cut (closed under, or answered in part): at most one.
        self.cut = 0
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return self._connections

    def serve_forever(self) -> None:
        """Accept and serve until ``close`` (run it in a thread)."""
        self._accept()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
                self._open.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, number), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        served = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                while len(buffer) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                method, target = lines[0].split(" ")[:2]
                with self._lock:
                    self.requests.append((number, f"{method} {target}"))
                served += 1
                if number == 1 and served == 2:
                    self.cut += 1
                if number == 1 and served == 2 and self.second == "close":
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if number == 1 and served == 2 and self.second == "partial":
                    conn.sendall(b"HTTP/1.1 20")
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                body = RESULTS_BODY if target.startswith("/v1/check") else ANSWER_BODY
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        self.sock.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


@contextmanager
def closing_server(second: Second = "close") -> Iterator[ClosingServer]:
    server = ClosingServer(second)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.close()
        thread.join(5)
