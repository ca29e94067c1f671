"""connshare quickstart: 4 worker processes, one upstream connection.

Runs a tiny upstream TCP server (a registry that counts its connections), starts 4
worker processes that each create the same client, and prints which process is the
leader, how many connections the upstream saw, and what every worker got.

    python examples/quickstart.py
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import socketserver
import threading
from typing import Any

from connshare import Base, cluster

# -- a tiny upstream: a registry over JSON lines, counting its connections ----------


class Registry(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.connections = 0
        self.services: dict[str, list] = {}
        self.watchers: dict[str, list] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), RegistryHandler)


class RegistryHandler(socketserver.StreamRequestHandler):
    server: Registry

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        try:
            self._serve()
        finally:  # a closed client stops being a watcher
            with self.server.lock:
                for watchers in self.server.watchers.values():
                    if self in watchers:
                        watchers.remove(self)

    def _serve(self) -> None:
        for line in self.rfile:
            msg = json.loads(line)
            with self.server.lock:
                if msg["op"] == "publish":
                    self.server.services.setdefault(msg["service"], []).append(msg["addr"])
                    targets = [(w, msg["service"]) for w in self.server.watchers.get(msg["service"], [])]
                elif msg["op"] == "watch":
                    self.server.watchers.setdefault(msg["service"], []).append(self)
                    targets = [(self, msg["service"])]
                else:  # count
                    targets = []
                    self.send({"id": msg["id"], "connections": self.server.connections})
                for w, service in targets:
                    w.send({"service": service, "addrs": sorted(self.server.services.get(service, []))})

    def send(self, obj: Any) -> None:
        try:
            self.wfile.write(json.dumps(obj).encode() + b"\n")
        except OSError:
            pass  # the watcher went away; its handler's finally drops it


# -- the data client: talks upstream, knows nothing of processes ---------------------


class RegistryClient(Base):
    def __init__(self, port: int) -> None:
        super().__init__()
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._file = self._sock.makefile("rwb")
        self._lock = threading.Lock()
        self._listeners: dict[str, list] = {}
        self._replies: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._ids = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.ready(True)

    def _send(self, msg: dict) -> None:
        with self._lock:
            self._file.write(json.dumps(msg).encode() + b"\n")
            self._file.flush()

    def _read(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    for fn in self._listeners.get(msg["service"], []):
                        fn(msg["addrs"])
        except (OSError, ValueError):
            pass  # closed: by close(), or by the registry as the demo ends

    def subscribe(self, reg: dict, listener: Any) -> None:
        self._listeners.setdefault(reg["service"], []).append(listener)
        self._send({"op": "watch", "service": reg["service"]})

    def publish(self, reg: dict) -> None:
        self._send({"op": "publish", **reg})

    def upstream_connections(self) -> int:
        """A blocking call: ask the upstream how many connections it has seen."""
        with self._cond:
            self._ids += 1
            rid = self._ids
        self._send({"op": "count", "id": rid})
        with self._cond:
            self._cond.wait_for(lambda: rid in self._replies, 5)
            return self._replies.pop(rid)["connections"]

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


# -- a worker process ------------------------------------------------------------------


def worker(index: int, upstream_port: int, connshare_port: int, out: Any, done: Any) -> None:
    client = (
        cluster(RegistryClient, name="registry", port=connshare_port)
        .delegate("upstream_connections")
        .create(upstream_port)
    )
    client.wait_ready(10)
    seen = threading.Event()
    events: list = []

    def on_change(addrs: list) -> None:
        events.append(addrs)
        if len(addrs) == 4:
            seen.set()

    client.subscribe({"service": "web"}, on_change)
    client.publish({"service": "web", "addr": f"10.0.0.{index + 1}:80"})
    seen.wait(10)
    out.put(
        {
            "worker": index,
            "pid": os.getpid(),
            "is_leader": client.is_leader,
            "upstream_connections": client.upstream_connections(),
            "web_instances_seen": events[-1] if events else None,
        }
    )
    done.wait(20)  # stay until every worker has reported, then leave together
    client.close()


def main() -> None:
    registry = Registry()
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    if os.environ.get("CONNSHARE_PORT"):  # connshare's own override, if set
        connshare_port = int(os.environ["CONNSHARE_PORT"])
    else:
        with socket.socket() as s:  # else a free port for the leader election
            s.bind(("127.0.0.1", 0))
            connshare_port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(i, registry.server_address[1], connshare_port, out, done)) for i in range(4)]
    for p in procs:
        p.start()
    try:
        reports = sorted((out.get(timeout=60) for _ in procs), key=lambda r: r["worker"])
        # Count now, while all 4 workers run: once they start leaving, a follower that
        # outlives the leader takes over and opens its own upstream connection.
        connections = registry.connections
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for r in reports:
        role = "LEADER  " if r["is_leader"] else "follower"
        print(
            f"worker {r['worker']} pid {r['pid']} {role} "
            f"upstream connections={r['upstream_connections']} saw web={r['web_instances_seen']}"
        )
    leaders = [r for r in reports if r["is_leader"]]
    print(f"leader: pid {leaders[0]['pid']}; the upstream saw {connections} connection(s) from 4 workers")
    registry.shutdown()
    assert len(leaders) == 1 and connections == 1


if __name__ == "__main__":
    main()
