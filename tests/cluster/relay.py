"""A TCP relay: makes a service of this machine that listens on loopback reachable from the real node's pods.

The pods reach the host at the node IP (the bridge's address) only, while the API server, the Temporal dev
server and the like listen on 127.0.0.1. A relay listens on ``node_ip:port`` and copies bytes both ways to the
target, which is looked up per connection (so it may be a pod IP known only later). Traffic stays on the
bridge and on loopback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

Target = Callable[[], tuple[str, int]]


class TcpRelay:
    """Listen on ``(host, port)`` (port 0: any free one) and relay each connection to ``target()``.

    Attributes:
        address: ``host:port`` it listens on, once started.
    """

    def __init__(self, host: str, target: Target, port: int = 0) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.address = ""
        self._listener: socket.socket | None = None
        self._closed = threading.Event()

    def start(self) -> TcpRelay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self.address = f"{self.host}:{self.port}"
        threading.Thread(target=self._accept, name=f"relay-{self.address}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                incoming, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(incoming,), daemon=True).start()

    def _connect(self, incoming: socket.socket) -> None:
        try:
            outgoing = socket.create_connection(self.target(), timeout=10)
        except OSError:
            incoming.close()
            return
        outgoing.settimeout(None)
        for source, sink in ((incoming, outgoing), (outgoing, incoming)):
            threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` into ``sink`` until either end closes; then close both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
