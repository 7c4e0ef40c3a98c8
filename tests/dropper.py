"""A loopback TCP proxy that drops connections part way, as a flaky network or a proxy
with a timeout does: the client sees its connection closed in the middle of a body."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


class DroppingProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream`. The first `cuts` connections are
    closed (both ways, at once) after `cut_after` bytes of the server's answer passed;
    later ones are left alone. `reset`: the client gets a TCP reset (a connection torn
    down), else a clean close (FIN, as a proxy's idle timeout often ends one)."""

    def __init__(self, upstream: int, cut_after: int, cuts: int = 1, *,
                 reset: bool = False) -> None:
        self.reset = reset
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts_left = cuts
        self.connections = 0
        self.cut = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._resetting: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DroppingProxy:
        self._start(self._accept)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            # close() alone does not wake a thread blocked in accept() (Linux): the join
            # below then waited its whole 10 s; shutdown() does.
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
        for t in self._threads:
            t.join(10)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
                limit = None
                if self.cuts_left > 0:
                    self.cuts_left -= 1
                    limit = self.cut_after
            self._start(self._pipe, client, upstream, None)
            self._start(self._pipe, upstream, client, limit)

    def _drop(self, client: socket.socket) -> None:
        if self.reset:
            # Linger on, for zero seconds: the last close() sends RST instead of FIN (and
            # nothing may shut it down before: that would send a FIN first).
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self._lock:
                self._resetting.add(client)
            # Wakes the other direction's recv (no packet is sent for SHUT_RD).
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while True:
                data = source.recv(1024 * 1024)
                if not data:
                    break
                if limit is not None and passed + len(data) >= limit:
                    sink.sendall(data[: limit - passed])
                    with self._lock:
                        self.cut += 1
                    self._drop(sink)
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                if s not in self._resetting:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
