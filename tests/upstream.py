"""A real upstream for the tests: a TCP key-value server with watches and
publications that counts its connections. JSON lines, one thread per connection."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from typing import Any


class UpstreamServer:
    def __init__(self) -> None:
        self.store: dict[str, Any] = {}
        self.watchers: dict[str, set[Any]] = {}
        self.publications: list[tuple[int, Any]] = []
        self.total_connections = 0
        self.live: set[Any] = set()
        self.lock = threading.Condition()
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                super().setup()
                self.wlock = threading.Lock()
                with server.lock:
                    server.total_connections += 1
                    server.live.add(self)
                    server.lock.notify_all()

            def send(self, obj: Any) -> None:
                with self.wlock:
                    try:
                        self.wfile.write(json.dumps(obj).encode() + b"\n")
                        self.wfile.flush()
                    except OSError:
                        pass

            def handle(self) -> None:
                for line in self.rfile:
                    msg = json.loads(line)
                    server.handle(self, msg)

            def finish(self) -> None:
                with server.lock:
                    server.live.discard(self)
                    for ws in server.watchers.values():
                        ws.discard(self)
                    server.publications = [p for p in server.publications if p[0] != id(self)]
                    server.lock.notify_all()
                try:
                    super().finish()
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._handler = Handler
        self._server_cls = Server
        self.port = 0
        self.up()

    def up(self) -> None:
        """Listen (again, on the same port after :meth:`down`); the data is kept."""
        self._server = self._server_cls(("127.0.0.1", self.port), self._handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening and drop every connection: connecting is refused until :meth:`up`."""
        self.close()

    def handle(self, conn: Any, msg: dict) -> None:
        op = msg["op"]
        with self.lock:
            if op == "get":
                reply = {"id": msg["id"], "value": self.store.get(msg["key"])}
            elif op == "watch":
                self.watchers.setdefault(msg["key"], set()).add(conn)
                # Sent under the lock: a set() right after must not reach this
                # watcher first, or the stale current value would come last.
                conn.send({"event": msg["key"], "value": self.store.get(msg["key"])})
                reply = None
            elif op == "unwatch":
                self.watchers.get(msg["key"], set()).discard(conn)
                reply = None
            elif op == "publish":
                self.publications.append((id(conn), msg["reg"]))
                self.lock.notify_all()
                reply = None
            else:
                reply = {"id": msg.get("id"), "error": f"unknown op {op}"}
        if reply is not None:
            conn.send(reply)

    def set(self, key: str, value: Any) -> None:
        """Change a value, as another system would; every watcher hears of it."""
        with self.lock:
            self.store[key] = value
            targets = list(self.watchers.get(key, ()))
        for conn in targets:
            conn.send({"event": key, "value": value})

    @property
    def live_connections(self) -> int:
        with self.lock:
            return len(self.live)

    def watcher_count(self, key: str) -> int:
        with self.lock:
            return len(self.watchers.get(key, ()))

    def published(self) -> list[Any]:
        with self.lock:
            return [p[1] for p in self.publications]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            conns = list(self.live)
        for c in conns:
            try:
                c.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
