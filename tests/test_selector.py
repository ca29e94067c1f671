"""connshare's selector runs its own readers inside ``select()``: on a real asyncio
loop with real sockets, the in-place reader keeps the loop's order, its removals
and its errors as a reader handle would."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from connshare._polling import PollingSelector


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.SelectorEventLoop(PollingSelector())
    yield loop
    loop.close()


@pytest.fixture
def pairs() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    made: list[socket.socket] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        made.extend((a, b))
        return a, b

    yield pair
    for s in made:
        s.close()


def _selector(loop: asyncio.AbstractEventLoop) -> PollingSelector:
    sel = loop._selector  # type: ignore[attr-defined]
    assert isinstance(sel, PollingSelector)
    return sel


def _in_place(loop: asyncio.AbstractEventLoop, sock: socket.socket, callback: Callable[[], Any]) -> None:
    loop.add_reader(sock.fileno(), callback)
    _selector(loop).read_in_place(sock.fileno(), callback)


def _run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Run ``loop`` until ``done()``. It checks on a timer, not by queuing a
    callback, so the loop otherwise sleeps in select() as connshare's does."""
    finished = loop.create_future()
    deadline = loop.time() + timeout

    def check() -> None:
        if done():
            finished.set_result(None)
        elif loop.time() > deadline:
            finished.set_exception(TimeoutError(f"not done within {timeout} s"))
        else:
            loop.call_later(0.02, check)

    check()
    loop.run_until_complete(finished)


def _drain(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return b""


def test_a_reader_in_place_runs_inside_select(loop, pairs) -> None:
    a, b = pairs()
    seen: list[tuple[bytes, bool]] = []

    def reader() -> None:
        inside = any(f.function == "select" and "_polling" in f.filename for f in inspect.stack())
        seen.append((_drain(a), inside))

    _in_place(loop, a, reader)
    b.send(b"ping")
    _run_until(loop, lambda: bool(seen))
    assert seen == [(b"ping", True)]


def test_callbacks_already_queued_run_before_a_reader_in_place(loop, pairs) -> None:
    # With callbacks queued the loop selects with a zero timeout: the reader then
    # waits its turn as a handle would, behind what was queued before its data.
    a, b = pairs()
    order: list[str] = []
    _in_place(loop, a, lambda: order.append("reader:" + _drain(a).decode()))

    def queue_then_send() -> None:
        b.send(b"x")
        loop.call_soon(order.append, "queued")

    loop.call_soon(queue_then_send)
    _run_until(loop, lambda: len(order) == 2)
    assert order == ["queued", "reader:x"]


def test_a_reader_removed_by_another_in_the_same_select_does_not_run(loop, pairs) -> None:
    (a1, b1), (a2, b2) = pairs(), pairs()
    ran: list[str] = []

    def reader(name: str, mine: socket.socket, other: socket.socket) -> Callable[[], None]:
        def read() -> None:
            ran.append(name)
            _drain(mine)
            loop.remove_reader(other.fileno())

        return read

    _in_place(loop, a1, reader("one", a1, a2))
    _in_place(loop, a2, reader("two", a2, a1))
    b1.send(b"x")
    b2.send(b"x")  # both readable before the loop selects
    _run_until(loop, lambda: bool(ran))
    loop.run_until_complete(asyncio.sleep(0.05))  # time for a second reader to run, wrongly
    assert len(ran) == 1, ran
    assert len(_selector(loop).in_place) == 1  # the reader that ran, still there


@pytest.mark.parametrize("error", [RuntimeError, asyncio.CancelledError])
def test_a_reader_that_raises_is_logged_and_the_others_still_run(loop, pairs, caplog, error: type[BaseException]) -> None:
    # CancelledError is a BaseException: a handle's would not end the loop either.
    (a1, b1), (a2, b2) = pairs(), pairs()
    got: list[bytes] = []

    def broken() -> None:
        _drain(a1)
        raise error("boom")

    _in_place(loop, a1, broken)
    _in_place(loop, a2, lambda: got.append(_drain(a2)))
    with caplog.at_level(logging.ERROR, logger="connshare"):
        b1.send(b"x")
        b2.send(b"y")
        _run_until(loop, lambda: bool(got))
        b1.send(b"again")
        b2.send(b"z")
        _run_until(loop, lambda: len(got) == 2)
    assert got == [b"y", b"z"]
    failures = [r for r in caplog.records if "reader of fd" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info and r.exc_info[0] is error for r in failures)


def test_a_socket_that_takes_a_closed_ones_fd_in_the_same_select_keeps_its_reader(loop, pairs) -> None:
    # A reader in place closes another socket, whose event is in the same select,
    # and a new socket takes its fd number: the loop must not act on the old
    # socket's key (its cancelled reader) against the new one.
    (a, a_peer), (b, b_peer) = pairs(), pairs()
    c, d = pairs()
    fd = b.fileno()
    got: list[bytes] = []

    def swap() -> None:
        _drain(a)
        loop.remove_reader(fd)
        b.close()
        os.dup2(c.fileno(), fd)  # fd now names c's socket
        loop.add_reader(fd, lambda: got.append(os.read(fd, 4096)))

    _in_place(loop, a, swap)
    loop.add_reader(fd, lambda: got.append(b"old reader"))  # a handle, not in place
    a_peer.send(b"x")
    b_peer.send(b"x")  # both readable before the loop selects
    try:
        _run_until(loop, lambda: b.fileno() == -1)
        d.send(b"for the new socket")
        _run_until(loop, lambda: bool(got), timeout=2.0)
        assert got == [b"for the new socket"]
    finally:
        if b.fileno() == -1:  # fd is c's dup now, ours to close
            loop.remove_reader(fd)
            os.close(fd)


def test_a_writer_on_the_same_fd_runs_in_the_same_pass(loop, pairs) -> None:
    a, b = pairs()
    events: list[str] = []

    def reader() -> None:
        events.append("read:" + _drain(a).decode())
        # runs in the loop's next pass: after the writer, if that runs in this one
        loop.call_soon(loop.call_soon, events.append, "next pass")

    def writer() -> None:
        events.append("write")
        loop.remove_writer(a.fileno())

    _in_place(loop, a, reader)
    loop.add_writer(a.fileno(), writer)  # a socketpair end is writable at once
    b.send(b"x")
    _run_until(loop, lambda: len(events) == 3)
    assert events == ["read:x", "write", "next pass"]
    assert a.fileno() in _selector(loop).in_place  # the reader stays after the writer goes


def test_removing_the_reader_forgets_it_with_or_without_a_writer(loop, pairs) -> None:
    (a1, _), (a2, _) = pairs(), pairs()
    read: list[bytes] = []
    _in_place(loop, a1, lambda: read.append(_drain(a1)))
    _in_place(loop, a2, lambda: read.append(_drain(a2)))
    loop.add_writer(a2.fileno(), lambda: None)
    loop.remove_reader(a1.fileno())  # the fd leaves the selector
    loop.remove_reader(a2.fileno())  # the fd stays, for its writer
    assert _selector(loop).in_place == {}
    loop.remove_writer(a2.fileno())
    # A reader added later on the same fd number, for another socket, is its own.
    c, d = pairs()
    fd = a1.fileno()
    os.dup2(c.fileno(), fd)  # fd now names c's socket
    loop.add_reader(fd, lambda: read.append(b"new:" + os.read(fd, 4096)))
    d.send(b"x")
    _run_until(loop, lambda: bool(read))
    assert read == [b"new:x"]
    loop.remove_reader(fd)
