"""The leader's scheduling priority: the ``leader_nice`` option.

Under CPU load the leader's event loop thread is the one serial step of every
follower's call, yet the kernel gives it the same share of a core as each worker's
own threads, so it sits runnable and waiting while they run. ``leader_nice`` runs
that thread at a lower nice value (a higher priority) while this process leads, and
puts the old value back when it stops. Threads started from the loop meanwhile (the
worker threads that run blocking methods, the real client's own) inherit it.

Linux only (nice is per thread there). A negative value needs ``CAP_SYS_NICE`` or
an ``RLIMIT_NICE`` allowance; without it connshare logs a warning and leads at the
normal priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("connshare.priority")

_LINUX = sys.platform.startswith("linux")

#: the values asked for by the nodes leading now (all on connshare's loop thread)
_held: list[int] = []
#: the loop thread's nice before the first of them
_base: int | None = None
_warned = False


def hold(nice: int) -> None:
    """On connshare's loop thread, as a node starts to lead: run the thread at
    ``nice``, or at the lowest value any leading node asked for."""
    global _base
    if not _LINUX:
        _warn_once("leader_nice is supported on Linux only; the leader runs at the normal priority")
        return
    if _base is None:
        _base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    _held.append(nice)
    _set(min(_held), nice)


def release(nice: int) -> None:
    """On connshare's loop thread, as a node stops leading."""
    global _base
    if not _LINUX or nice not in _held:
        return
    _held.remove(nice)
    if _held:
        _set(min(_held), nice)
    elif _base is not None:
        _set(_base, nice)  # raising the value back is always allowed
        _base = None


def _set(value: int, asked: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError as exc:
        _warn_once(
            f"leader_nice={asked} was refused ({exc.strerror}): a negative value needs CAP_SYS_NICE or an "
            "RLIMIT_NICE allowance (systemd LimitNICE=, docker --cap-add SYS_NICE); the leader runs at the normal priority"
        )


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(message)


def _after_fork_in_child() -> None:
    global _base, _warned
    # The child's loop thread is a new one, at the forking thread's priority.
    _held.clear()
    _base = None
    _warned = False


os.register_at_fork(after_in_child=_after_fork_in_child)
