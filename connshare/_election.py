"""Winning the port, or finding the leader that holds it.

The leader is whoever binds and listens on 127.0.0.1:port. SO_REUSEADDR lets a new
leader bind while the old one's connections sit in TIME_WAIT; on Linux and macOS it
never lets two sockets listen on one address and port (SO_REUSEPORT would, and is
never set).
"""

from __future__ import annotations

import errno
import socket

HOST = "127.0.0.1"


def try_bind(port: int) -> socket.socket | None:
    """A listening socket on the port, or None if another socket holds it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return None
        raise
    sock.setblocking(False)
    return sock


def port_owner(port: int) -> tuple[str | None, str | None]:
    """A description of the process listening on ``port`` and its status, where
    psutil can see it."""
    import psutil  # only for this diagnostic: ~0.6 MB a worker need not pay

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                try:
                    p = psutil.Process(c.pid)
                    cmd = " ".join(p.cmdline())[:200]
                    return f"pid {c.pid} ({p.name()}: {cmd})", p.status()
                except psutil.Error:
                    return f"pid {c.pid}", None
    except (psutil.Error, OSError):
        pass
    return None, None
