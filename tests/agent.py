"""A worker process driven by the tests over a pipe: it builds connshare clients
and runs commands on them, and streams subscription events back."""

from __future__ import annotations

import _thread
import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import connshare
from tests import clients as client_classes


def describe(exc: BaseException) -> dict:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": _text(exc),
        "args": [a if isinstance(a, (str, int, float, bool, type(None))) else repr(a) for a in exc.args],
        "remote_traceback": getattr(exc, "remote_traceback", None),
        "cause": type(exc.__cause__).__name__ if exc.__cause__ else None,
        "context": type(exc.__context__).__name__ if exc.__context__ else None,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:  # an exception whose __str__ raises is one of the cases
        return f"<str() failed: {err!r}>"


def build(spec: dict) -> Any:
    module = importlib.import_module(spec["module"]) if "module" in spec else client_classes
    cls = getattr(module, spec["cls"])
    b = connshare.cluster(cls, **spec.get("options", {}))
    for d in spec.get("delegates", []):
        if isinstance(d, str):
            b.delegate(d)
        else:
            b.delegate(d[0], d[1], **(d[2] if len(d) > 2 else {}))
    return b.create(*spec.get("args", ()))


def _run_closing(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    """Run ``coro`` on a loop of its own and close the loop, as ``asyncio.run`` does."""
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Agent:
    def __init__(self, conn: Any, specs: list[dict]) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.aloop = asyncio.new_event_loop()
        threading.Thread(target=self.aloop.run_forever, daemon=True, name="agent-loop").start()
        self.clients: dict[str, Any] = {}
        self.errors: dict[str, list] = {}
        self.loopers: dict[str, Any] = {}
        for i, spec in enumerate(specs):
            self.op_create(spec, str(i))

    def _note_error(self, cid: str, exc: BaseException) -> None:
        """Keep an error event, and send it as an event tagged ``error:<cid>``, in
        its place among the listeners' events."""
        self.errors[cid].append(describe(exc))
        self.send(("event", f"error:{cid}", type(exc).__name__, {}))

    def send(self, msg: Any) -> None:
        with self.lock:
            self.conn.send(msg)

    def run(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)
            cmd_id, op, args = msg
            if op == "leave":
                # End as a program does: main returns, the interpreter exits and
                # runs its atexit hooks; no client is closed by the app.
                self.send(("reply", cmd_id, True, None))
                return
            if op == "call_in_main":  # where Ctrl-C's KeyboardInterrupt lands
                self.serve(cmd_id, op, args)
                continue
            threading.Thread(target=self.serve, args=(cmd_id, op, args), daemon=True).start()

    def serve(self, cmd_id: int, op: str, args: tuple) -> None:
        try:
            result = getattr(self, "op_" + op)(*args)
            self.send(("reply", cmd_id, True, result))
        except BaseException as exc:
            self.send(("reply", cmd_id, False, describe(exc)))

    def _await(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.aloop).result(timeout)

    # -- ops -------------------------------------------------------------------------
    def op_create(self, spec: dict, default_id: str = "0") -> None:
        """Create one more client, as an app that makes a client on first use."""
        cid = spec.get("id", default_id)
        self.clients[cid] = build(spec)
        self.errors[cid] = []
        self.clients[cid].on("error", lambda exc: self._note_error(cid, exc))

    def op_pid(self) -> int:
        return os.getpid()

    def op_ready(self, cid: str, timeout: float) -> dict:
        self.clients[cid].wait_ready(timeout)
        return self.op_role(cid)

    def op_role(self, cid: str) -> dict:
        c = self.clients[cid]
        return {"pid": os.getpid(), "is_leader": c.is_leader, "leader_pid": c.leader_pid, "role": c.role}

    def op_call(self, cid: str, method: str, args: list, kwargs: dict | None = None) -> Any:
        fn = getattr(self.clients[cid], method)
        res = fn(*args, **(kwargs or {}))
        if asyncio.iscoroutine(res):
            return self._await(res)
        return res

    def op_timed_call(self, cid: str, method: str, args: list) -> tuple[Any, float]:
        t0 = time.monotonic()
        res = self.op_call(cid, method, args)
        return res, time.monotonic() - t0

    def op_acall(self, cid: str, method: str, args: list) -> Any:
        c = self.clients[cid]

        async def go() -> Any:
            return await getattr(c, method)(*args)

        return self._await(go())

    def op_acall_cancelled(self, cid: str, method: str, args: list, after: float) -> bool:
        """Await a call from this agent's loop and cancel the awaiting task after
        ``after`` s; whether the task ended cancelled."""
        c = self.clients[cid]

        async def go() -> bool:
            task = asyncio.ensure_future(getattr(c, method)(*args))
            await asyncio.sleep(after)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        return self._await(go())

    def op_acalls_cut_short(self, cid: str, method: str, args: list, n: int, cut: float) -> dict:
        """``n`` times: await a call under ``asyncio.wait_for(..., cut)``, then at
        once ``aecho``, the usual retry; how each went, by kind."""
        c = self.clients[cid]

        async def go() -> dict:
            kinds: dict[str, int] = {}
            for i in range(n):
                try:
                    await asyncio.wait_for(getattr(c, method)(*args), cut)
                    kind = "finished"
                except asyncio.TimeoutError:
                    kind = "cut"
                kinds[kind] = kinds.get(kind, 0) + 1
                try:
                    kind = "next ok" if await c.aecho(i) == i else "next wrong"
                except Exception as exc:
                    kind = f"next {type(exc).__name__}"
                kinds[kind] = kinds.get(kind, 0) + 1
            return kinds

        return self._await(go())

    def op_ainvoke_on_connshare_loop(self, cid: str, method: str, args: list) -> Any:
        """``ainvoke`` awaited on connshare's own loop, where a coroutine listener runs."""
        c = self.clients[cid]

        async def go() -> Any:
            return await c.ainvoke(method, *args)

        from connshare._loop import get_loop

        return asyncio.run_coroutine_threadsafe(go(), get_loop()).result(60)

    def op_ainvoke(self, cid: str, method: str, args: list) -> Any:
        c = self.clients[cid]
        return self._await(c.ainvoke(method, *args))

    def op_invoke(self, cid: str, method: str, args: list) -> Any:
        return self.clients[cid].invoke(method, *args)

    def op_subscribe(self, cid: str, reg: Any, tag: str, in_loop: bool | str = False, method: str = "subscribe") -> None:
        """``in_loop``: register from the agent's running loop (True), or from a loop
        that ends right after (``"ended"``, as in an ``asyncio.run()``)."""
        c = self.clients[cid]

        def listener(value: Any) -> None:
            on_loop = False
            try:
                on_loop = asyncio.get_running_loop() is self.aloop
            except RuntimeError:
                pass
            self.send(("event", tag, value, {"on_agent_loop": on_loop, "thread": threading.current_thread().name}))

        if in_loop:

            async def sub() -> None:
                getattr(c, method)(reg, listener)

            if in_loop == "ended":
                asyncio.run(sub())
            else:
                self._await(sub())
        else:
            getattr(c, method)(reg, listener)

    def op_subscribe_summary(self, cid: str, reg: Any, tag: str) -> None:
        """Like subscribe, but send back only ``{"seq", "size"}`` of each value (for
        large values that the pipe to the test should not carry)."""

        def listener(value: Any) -> None:
            self.send(("event", tag, {"seq": value["seq"], "size": len(value["data"])}, {}))

        self.clients[cid].subscribe(reg, listener)

    def op_subscribe_calling(self, cid: str, reg: Any, tag: str) -> None:
        """A listener that makes a blocking call (on connshare's thread)."""
        c = self.clients[cid]

        def listener(value: Any) -> None:
            try:
                c.echo(1)
                self.send(("event", tag, "no error", {}))
            except Exception as exc:
                self.send(("event", tag, describe(exc)["mro"], {}))

        c.subscribe(reg, listener)

    def op_subscribe_sleeper(self, cid: str, reg: Any, seconds: float) -> None:
        """A listener on connshare's thread that blocks it for ``seconds`` the first
        time the value is ``"block"``; ``loop_blocked`` tells while it does."""
        self.loop_blocked = threading.Event()
        blocked_once: list[bool] = []

        def listener(value: Any) -> None:
            if value.get("value") == "block" and not blocked_once:
                blocked_once.append(True)
                self.loop_blocked.set()
                time.sleep(seconds)
                self.loop_blocked.clear()

        self.clients[cid].subscribe(reg, listener)

    def op_subscribe_then_unsubscribe(self, cid: str, reg: Any, tag: str) -> None:
        """Subscribe and unsubscribe at once: before the leader can answer."""

        def listener(value: Any) -> None:
            self.send(("event", tag, value, {}))

        self.clients[cid].subscribe(reg, listener)
        self.clients[cid].unsubscribe(reg, listener)

    def op_subscribe_exiting(self, cid: str, reg: Any, tag: str) -> None:
        """A listener that reports, then calls sys.exit() (on connshare's thread)."""

        def listener(value: Any) -> None:
            self.send(("event", tag, value, {"thread": threading.current_thread().name}))
            sys.exit(0)

        self.clients[cid].subscribe(reg, listener)

    def op_unsubscribe(self, cid: str, reg: Any) -> None:
        self.clients[cid].unsubscribe(reg)

    def op_publish(self, cid: str, reg: Any) -> None:
        self.clients[cid].publish(reg)

    def op_errors(self, cid: str) -> list:
        return list(self.errors[cid])

    def op_close(self, cid: str) -> None:
        self.clients[cid].close()

    def op_start_calls(self, cid: str, method: str, args: list, name: str = "calls", awaited: bool = False) -> None:
        """Call in a loop on a thread until stop_calls; record every outcome.
        ``awaited``: await ``ainvoke(method)`` on an event loop of that thread."""
        c = self.clients[cid]
        state = {"ok": 0, "errors": {}, "max": 0.0, "stop": False, "samples": []}
        self.loopers[name] = state

        def record(t0: float, exc: Exception | None) -> None:
            if exc is None:
                state["ok"] += 1
            else:
                state["errors"][type(exc).__name__] = state["errors"].get(type(exc).__name__, 0) + 1
            state["max"] = max(state["max"], time.monotonic() - t0)

        def run() -> None:
            fn = getattr(c, method)
            while not state["stop"]:
                t0 = time.monotonic()
                try:
                    fn(*args)
                except Exception as exc:
                    record(t0, exc)
                else:
                    record(t0, None)

        async def arun() -> None:
            while not state["stop"]:
                t0 = time.monotonic()
                try:
                    await c.ainvoke(method, *args)
                except Exception as exc:
                    record(t0, exc)
                else:
                    record(t0, None)

        t = threading.Thread(target=(lambda: _run_closing(asyncio.new_event_loop(), arun())) if awaited else run, daemon=True)
        state["thread"] = t
        t.start()

    def op_calls_so_far(self, name: str = "calls") -> dict:
        s = self.loopers[name]
        return {"ok": s["ok"], "errors": dict(s["errors"]), "max": s["max"]}

    def op_stop_calls(self, name: str = "calls") -> dict:
        s = self.loopers.pop(name)
        s["stop"] = True
        s["thread"].join(30)
        return {"ok": s["ok"], "errors": s["errors"], "max": s["max"], "alive": s["thread"].is_alive()}

    def op_hold_goodbye_until_a_send(self, cid: str) -> None:
        """Force one interleaving of a graceful handoff on the client's connection
        to the leader: the GOODBYE, once read, is handled by connshare's loop only
        while the next request's frame has just been sent, before that request's
        sender goes on. op_goodbye_held tells whether it happened."""
        from connshare._protocol import MsgType

        node = self.clients[cid]._node
        conn = node.conn
        held: list = []
        self.goodbye_held = threading.Event()
        on_frame, send = conn._on_frame, conn.send

        def hold(c: Any, wire: list, now: list | None) -> None:
            if wire[0] == MsgType.GOODBYE and not held:
                held.append(wire)
            else:
                on_frame(c, wire, now)

        def send_then_goodbye(frame: bytes, *timeout: float) -> None:
            send(frame, *timeout)
            if held and not self.goodbye_held.is_set():
                on_frame(conn, held[0], None)
                handled = threading.Event()
                node.loop.call_soon_threadsafe(handled.set)  # queued behind the GOODBYE
                handled.wait(10)
                self.goodbye_held.set()

        conn._on_frame, conn.send = hold, send_then_goodbye

    def op_unresponsive_during_next_send(self, cid: str) -> None:
        """Force one interleaving: the heartbeat check marks the leader unresponsive
        right after the next request's frame is sent, before its sender goes on."""
        conn = self.clients[cid]._node.conn
        send = conn.send

        def send_then_mark(frame: bytes, *timeout: float) -> None:
            send(frame, *timeout)
            conn.send = send
            conn.mark_unresponsive()

        conn.send = send_then_mark

    def op_goodbye_held(self) -> bool:
        return self.goodbye_held.is_set()

    def op_call_in_thread(self, cid: str, method: str, args: list, name: str) -> None:
        """Start one blocking call on its own thread; op_join_call returns its outcome."""
        c = self.clients[cid]
        box: dict = {}

        def run() -> None:
            try:
                box["result"] = ("ok", getattr(c, method)(*args))
            except BaseException as exc:  # KeyboardInterrupt included
                box["result"] = ("raised", describe(exc))

        t = threading.Thread(target=run, daemon=True, name=name)
        self.loopers[name] = {"thread": t, "box": box}
        t.start()

    def op_conn_id(self, cid: str) -> int | None:
        """Which connection to the leader the client's node holds (None: none)."""
        conn = self.clients[cid]._node.conn
        return None if conn is None else id(conn)

    def op_pending(self, cid: str) -> int:
        """Requests the client's connection to the leader waits for answers to (0
        while it has none: a connection that ended failed what it awaited)."""
        conn = self.clients[cid]._node.conn
        return 0 if conn is None else len(conn.pending)

    def op_close_counting_calls_left(self, cid: str) -> int:
        """close() the client; then how many coroutine calls (this process's own
        too) its node's loop still drives: a closing leader's, past its grace."""
        node = self.clients[cid]._node
        self.clients[cid].close()
        return len(node.runner._tasks)

    def op_inflight(self, cid: str) -> int:
        """How many calls the client's node runs for others (as leader) now."""
        return self.clients[cid]._node.inflight

    def op_registrations_waiting(self, cid: str) -> int:
        """How many followers' REGISTERs the client's node (as leader) holds, waiting
        for its process to create their channel."""
        return sum(len(peer._tasks) for peer in list(self.clients[cid]._node.peers))

    def op_loops_remembered(self, cid: str) -> int:
        """How many event loops the connection keeps an expiry timer record for."""
        return len(self.clients[cid]._node.conn._deadlines.armed)

    def op_call_running(self, name: str) -> bool:
        return self.loopers[name]["thread"].is_alive()

    def op_join_call(self, name: str, timeout: float = 30) -> Any:
        s = self.loopers.pop(name)
        s["thread"].join(timeout)
        return s["box"].get("result", ("running", None))

    def op_call_in_main(self, cid: str, method: str, args: list, interrupt_main: bool = False) -> tuple[str, Any]:
        """One blocking call on the main thread (no other op is read meanwhile);
        its outcome, KeyboardInterrupt included. ``interrupt_main``: once the call
        reads its answer, ``_thread.interrupt_main()`` (what pytest-timeout's
        thread method and others use): no signal ends the caller's recv, and the
        main thread notices at its next check, between reads."""
        # Ctrl-C raises here even if this process was started with SIGINT ignored
        # (a shell's background job), as an app's main thread would have it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if interrupt_main:
            conn = self.clients[cid]._node.conn

            def interrupt() -> None:
                deadline = time.monotonic() + 10
                while not (conn.pending and conn._rtoken.locked()) and time.monotonic() < deadline:
                    time.sleep(0.001)
                _thread.interrupt_main()

            threading.Thread(target=interrupt, daemon=True).start()
        try:
            return ("ok", getattr(self.clients[cid], method)(*args))
        except BaseException as exc:
            return ("raised", describe(exc))

    def op_interrupt_call(self, name: str) -> None:
        """Raise KeyboardInterrupt in that call's thread, as Ctrl-C would in a main thread."""
        import ctypes

        ident = self.loopers[name]["thread"].ident
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))

    def op_interrupt_after_next_read(self, cid: str, name: str) -> None:
        """The next recv on the connection to the leader that brings data, in the
        thread of call ``name``, raises KeyboardInterrupt as it returns: where Ctrl-C
        can land in a reading caller before what it read is handled."""
        conn = self.clients[cid]._node.conn
        conn.sock = sock = _Interrupting(conn.sock, name)
        # a recv that thread had begun (a slice of up to 50 ms) reads past us
        if not sock.entered.wait(10):
            raise TimeoutError(f"call {name!r} did not read the socket")

    def op_interrupt_mid_send(self, cid: str, name: str) -> None:
        """The next send to the leader from the thread of call ``name`` sends half
        its bytes and raises KeyboardInterrupt: Ctrl-C landing in a partial send."""
        conn = self.clients[cid]._node.conn
        conn.sock = _Interrupting(conn.sock, name)

    def _reads_here(self, cid: str) -> bool:
        """Whether the running loop holds the follower connection's reader role
        (a test's precondition: the case it means to test did happen)."""
        conn = self.clients[cid]._node.conn
        return conn is not None and conn._role is asyncio.get_running_loop()

    async def _acall_reading(self, cid: str, method: str, args: list) -> tuple[Any, bool]:
        # A loop takes the role only when nobody is reading at that instant (a
        # heartbeat's answer may be in the middle of a read): call until it holds
        # the role after a call, for a few seconds (a loaded CI host once took more
        # than 20 calls).
        c = self.clients[cid]
        deadline = time.monotonic() + 5.0
        while True:
            res = await getattr(c, method)(*args)
            if self._reads_here(cid):
                return res, True
            if time.monotonic() > deadline:
                return res, False

    def op_acall_on_fresh_loop(self, cid: str, method: str, args: list, kind: str = "asyncio") -> tuple[Any, bool]:
        """Awaitable calls on a new event loop (``asyncio`` or ``uvloop``) that is
        closed right after, as ``asyncio.run`` does; whether it read the last answer."""

        async def go() -> Any:
            return await self._acall_reading(cid, method, args)

        if kind == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        return _run_closing(loop, go())

    def op_acalls_counting_loop_passes(self, cid: str, method: str, args: list, n: int) -> dict:
        """``n`` sequential awaited calls on a fresh asyncio loop that counts its
        passes; whether every call returned its echo, and the passes."""

        class CountingLoop(asyncio.SelectorEventLoop):
            passes = 0

            def _run_once(self) -> None:
                self.passes += 1
                super()._run_once()

        fn = getattr(self.clients[cid], method)

        async def go() -> bool:
            return all([await fn(*args) == args[0] for _ in range(n)])

        loop = CountingLoop()
        ok = _run_closing(loop, go())
        return {"ok": ok, "passes": loop.passes}

    def op_acalls_straddling(self, cid: str, n: int, seconds: float) -> dict:
        """``n`` awaited calls on a fresh loop, quick ones between ones that take
        about ``seconds`` (near the in-place wait): answers that come as a wait ends.
        How many returned their own result, and any that did not."""
        c = self.clients[cid]

        async def go() -> dict:
            bad = []
            for i in range(n):
                want = seconds if i % 2 else i
                got = await (c.asleep(seconds) if i % 2 else c.aecho(i))
                if got != want:
                    bad.append([i, got])
            return {"ok": n - len(bad), "bad": bad[:5]}

        return _run_closing(asyncio.new_event_loop(), asyncio.wait_for(go(), 120))

    def op_calls_straddling(self, cid: str, n: int, seconds: float) -> dict:
        """``op_acalls_straddling``'s calls, from this (blocking) thread."""
        c = self.clients[cid]
        bad = []
        for i in range(n):
            want = seconds if i % 2 else i
            got = c.sleep(seconds) if i % 2 else c.echo(i)
            if got != want:
                bad.append([i, got])
        return {"ok": n - len(bad), "bad": bad[:5]}

    def op_spin_state(self, cid: str) -> dict | None:
        """The connection's ``spin_wait`` policy (None: it never polls)."""
        spin = self.clients[cid]._node.conn._spin
        return None if spin is None else {"backoff": spin.backoff, "skip": spin.skip}

    def op_calls_until_a_poll_answers(self, cid: str, awaited: bool, n: int) -> bool:
        """Up to ``n`` quick calls, until one leaves the ``spin_wait`` policy reset
        (its answer read while polling): whether one did. In here, not one request
        per call: on a loaded host polls may miss for a thousand calls in a row."""
        c = self.clients[cid]
        spin = c._node.conn._spin
        loop = asyncio.new_event_loop() if awaited else None
        try:
            for _ in range(n):
                got = loop.run_until_complete(c.aecho("q")) if loop is not None else c.echo("q")
                assert got == "q", got
                if spin.backoff == 1 and spin.skip == 0:
                    return True
            return False
        finally:
            if loop is not None:
                loop.close()

    def op_leader_spin_state(self) -> dict | None:
        """The ``leader_spin_wait`` policy of connshare's loop here (None: no poll)."""
        from connshare._loop import loop_selector

        spin = loop_selector().spin  # type: ignore[union-attr]
        return None if spin is None else {"wait": spin.wait, "backoff": spin.backoff, "skip": spin.skip}

    def op_in_place_readers(self) -> int | None:
        """The fds connshare's loop reads inside its select() (None: uvloop, no selector)."""
        from connshare._loop import loop_selector

        selector = loop_selector()
        return None if selector is None else len(selector.in_place)

    def op_threads_waiting_on_loop(self) -> int:
        """Threads of this process waiting on connshare's loop (the leader polls not)."""
        from connshare._polling import waits

        return len(waits)

    def op_tick_loop(self, every: float, seconds: float) -> dict:
        """Wake connshare's loop every ``every`` s for ``seconds`` with a timer of its
        own, as a client's ticker would: the loop thread's CPU time meanwhile, and
        the ``leader_spin_wait`` policy at the end."""
        from connshare._loop import get_loop

        loop = get_loop()

        async def tick() -> float:
            t0 = time.thread_time()
            end = loop.time() + seconds
            while loop.time() < end:
                await asyncio.sleep(every)
            return time.thread_time() - t0

        cpu = asyncio.run_coroutine_threadsafe(tick(), loop).result(seconds + 30)
        return {"cpu_s": cpu, "spin": self.op_leader_spin_state()}

    def op_acall_with_timer(self, cid: str, method: str, args: list, after: float) -> dict:
        """An awaited call on a fresh loop with a timer due ``after`` s into it:
        whether the timer fired before the call returned."""
        fired: list[bool] = []
        fn = getattr(self.clients[cid], method)

        async def go() -> Any:
            done: list[bool] = []
            asyncio.get_running_loop().call_later(after, lambda: fired.append(not done))
            result = await fn(*args)
            done.append(True)
            return result

        result = _run_closing(asyncio.new_event_loop(), go())
        return {"result": result, "timer_fired_during_call": fired == [True]}

    def op_acall_then_block_loop(self, cid: str, method: str, args: list, seconds: float) -> tuple[Any, bool]:
        """An awaitable call on the agent's loop, whose continuation then blocks the
        loop with app code for ``seconds``; the result, and whether the loop held
        the reader role as it blocked."""
        self.loop_blocked = threading.Event()
        box: dict = {}

        async def go() -> None:
            box["out"] = await self._acall_reading(cid, method, args)
            self.loop_blocked.set()
            time.sleep(seconds)
            self.loop_blocked.clear()

        asyncio.run_coroutine_threadsafe(go(), self.aloop)
        self.loop_blocked.wait(10)
        return box["out"]

    def op_blocking_call_on_a_reading_loop(self, cid: str, method: str, args: list) -> dict:
        """On the agent's loop while it reads the connection, an awaited call in
        flight: a blocking call of ``method`` from that loop's own thread (an app's
        mistake in an async handler). Its result, whether the loop held the reader
        role as it made it, and how often connshare's loop had to take the role
        back from the loop the call blocked."""
        c = self.clients[cid]
        stalls: list[str] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "stalled" in record.getMessage():
                    stalls.append(record.getMessage())

        flog = logging.getLogger("connshare.follower")
        catch, level = Catch(logging.DEBUG), flog.level
        flog.addHandler(catch)
        flog.setLevel(logging.DEBUG)

        async def go() -> dict:
            # The loop takes the role as its request leaves, unless someone reads
            # at that instant (a heartbeat's answer): then try again, for a while.
            deadline = time.monotonic() + 5.0
            while True:
                slow = asyncio.ensure_future(c.asleep(0.5))
                await asyncio.sleep(0)  # its request leaves
                reads = self._reads_here(cid)
                if reads or time.monotonic() > deadline:
                    break
                await slow
            result = getattr(c, method)(*args)  # blocks this loop
            await slow
            return {"result": result, "loop_read": reads, "stalls": len(stalls)}

        try:
            return self._await(go())
        finally:
            flog.removeHandler(catch)
            flog.setLevel(level)

    def op_acalls_then_block_loop(self, cid: str, method: str, argsets: list, seconds: float) -> None:
        """Start awaitable calls in one turn of the agent's loop, then block that loop
        with app code for ``seconds``, in the same turn, before it comes round."""
        c = self.clients[cid]
        self.loop_blocked = threading.Event()

        def block() -> None:
            self.loop_blocked.set()
            time.sleep(seconds)
            self.loop_blocked.clear()

        async def go() -> None:
            # each task's first step (its send) runs next turn
            self.bg_tasks = [asyncio.ensure_future(getattr(c, method)(*args)) for args in argsets]
            asyncio.get_running_loop().call_soon(block)  # ...and this, after them

        asyncio.run_coroutine_threadsafe(go(), self.aloop)  # its result waits for block()
        self.loop_blocked.wait(10)

    def op_acalls_then_kill_leader(self, cid: str, method: str, argsets: list, wait: float) -> list:
        """Start awaitable calls in one turn of the agent's loop; in that same turn,
        SIGKILL the leader and hold the loop until connshare has moved to another
        leader. Each call's ``("ok", result)``, ``("raised", type)`` or ``("pending",)``."""
        c = self.clients[cid]

        def kill() -> None:
            old = c.leader_pid
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while c.leader_pid == old and time.monotonic() < deadline:
                time.sleep(0.005)

        async def one(args: list) -> tuple:
            try:
                return ("ok", await getattr(c, method)(*args))
            except Exception as exc:
                return ("raised", type(exc).__name__)

        async def go() -> list:
            tasks = [asyncio.ensure_future(one(a)) for a in argsets]
            asyncio.get_running_loop().call_soon(kill)  # after their first steps, same turn
            await asyncio.wait(tasks, timeout=wait)
            return [t.result() if t.done() else ("pending",) for t in tasks]

        return asyncio.run_coroutine_threadsafe(go(), self.aloop).result(wait + 20)

    def op_acalls_at_once(self, calls: list, wait: float) -> list:
        """Start awaitable calls ``[cid, method, args]`` together on the agent's loop;
        after ``wait`` s, each one's ``("ok", result)``, ``("raised", type, seconds)``
        or ``("pending",)`` (then cancelled)."""

        async def one(cid: str, method: str, args: list) -> tuple:
            t0 = time.monotonic()
            try:
                return ("ok", await getattr(self.clients[cid], method)(*args))
            except Exception as exc:
                return ("raised", type(exc).__name__, time.monotonic() - t0)

        async def go() -> list:
            tasks = [asyncio.ensure_future(one(*c)) for c in calls]
            await asyncio.wait(tasks, timeout=wait)
            out = [t.result() if t.done() else ("pending",) for t in tasks]
            for t in tasks:
                t.cancel()
            return out

        return asyncio.run_coroutine_threadsafe(go(), self.aloop).result(wait + 10)

    def op_acall_burst(self, cid: str, method: str, n: int, size: int) -> dict:
        """``n`` awaitable calls started in one loop turn, each with its own
        ``size``-byte payload; how many came back right, and the errors."""
        c = self.clients[cid]

        async def one(k: int) -> bool:
            p = f"{k:08d}" + "x" * (size - 8)
            r = await getattr(c, method)(p)
            return r == (len(p) if method == "asize" else p)

        async def go() -> dict:
            res = await asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)
            errors = sorted({type(r).__name__ for r in res if isinstance(r, BaseException)})
            return {"ok": sum(r is True for r in res), "errors": errors}

        return asyncio.run_coroutine_threadsafe(go(), self.aloop).result(120)

    def op_loop_blocked(self) -> bool:
        return self.loop_blocked.is_set()

    def op_cpu_call(self, cid: str, method: str, args: list) -> tuple[Any, float]:
        """A blocking call and the CPU time its thread spent in it."""
        t0 = time.thread_time()
        res = getattr(self.clients[cid], method)(*args)
        return res, time.thread_time() - t0

    def op_hammer(self, cid: str, threads: int, per_thread: int, tasks: int) -> dict:
        """Blocking calls from many threads and awaitable ones from one loop, at once,
        each with its own payload; counts answers that came back to the wrong caller."""
        c = self.clients[cid]
        bad: list = []
        errors: list = []

        def blocking(t: int) -> None:
            for i in range(per_thread):
                try:
                    v = c.echo([t, i])
                    if v != [t, i]:
                        bad.append(v)
                except Exception as exc:
                    errors.append(describe(exc)["type"])

        async def awaiting(k: int) -> None:
            for i in range(per_thread):
                try:
                    v = await c.aecho(["a", k, i])
                    if v != ["a", k, i]:
                        bad.append(v)
                except Exception as exc:
                    errors.append(describe(exc)["type"])

        async def all_tasks() -> None:
            await asyncio.gather(*(awaiting(k) for k in range(tasks)))

        ths = [threading.Thread(target=blocking, args=(t,)) for t in range(threads)]
        fut = asyncio.run_coroutine_threadsafe(all_tasks(), self.aloop)
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
        fut.result(120)
        return {"bad": len(bad), "errors": errors}

    def op_runner_without_lending(self) -> None:
        """Make this process's runner take the path an asyncio without
        ``_enter_task`` would: a Task of its own for every coroutine call."""
        from connshare import _runner

        _runner._enter_task = None

    def op_slow_watch(self, seconds: float) -> None:
        """Space this process's connection watch ticks ``seconds`` apart, so that
        nothing a test checks can be done by a tick."""
        from connshare import _follower

        _follower._WATCH_S = seconds

    def op_loop_nice(self) -> int:
        """The nice value of connshare's loop thread in this process."""
        from connshare import _loop

        _loop.get_loop()
        return os.getpriority(os.PRIO_PROCESS, _loop._thread.native_id)  # type: ignore[union-attr]

    def op_warnings(self) -> list[str]:
        """What connshare logged at WARNING or above in this process."""
        return list(WARNINGS)

    def op_exit(self) -> None:
        os._exit(0)


#: connshare's warnings in this process, for op_warnings
WARNINGS: list[str] = []


class _Interrupting:
    """A follower connection's socket where, in one thread, the next recv with data
    raises KeyboardInterrupt after reading, and the next send sends half its bytes
    and raises it; otherwise the socket itself."""

    def __init__(self, sock: socket.socket, thread_name: str) -> None:
        self._sock = sock
        self._thread_name = thread_name
        self.entered = threading.Event()
        self.fired = False

    def recv_into(self, *args: Any) -> int:
        mine = threading.current_thread().name == self._thread_name
        if mine:
            self.entered.set()
        n = self._sock.recv_into(*args)
        if n and mine and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return n

    def send(self, data: Any, *args: Any) -> int:
        if threading.current_thread().name == self._thread_name and not self.fired:
            self.fired = True
            self._sock.send(memoryview(data)[: len(data) // 2], *args)
            raise KeyboardInterrupt
        return self._sock.send(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if len(WARNINGS) < 1000:
            WARNINGS.append(record.getMessage())


def drop_cap_sys_nice() -> None:
    """This thread, and the threads it starts from now on, lose CAP_SYS_NICE: like
    an unprivileged worker, they may not lower a nice value (capset is per thread)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    hdr = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    cap = 1 << 23  # CAP_SYS_NICE
    data[0].effective &= ~cap
    data[0].permitted &= ~cap
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def agent_main(conn: Any, specs: list[dict]) -> None:
    logging.basicConfig(level=os.environ.get("CONNSHARE_TEST_LOG", "WARNING"))
    keep = _Keep(logging.WARNING)
    logging.getLogger("connshare").addHandler(keep)
    try:
        if any(s.get("no_cap_sys_nice") for s in specs):
            drop_cap_sys_nice()  # before connshare's loop thread starts
        loops = {s["connshare_loop"] for s in specs if "connshare_loop" in s}
        if "asyncio" in loops:
            os.environ["CONNSHARE_LOOP"] = "asyncio"  # not uvloop, even where installed
        elif "uvloop" in loops:
            os.environ.pop("CONNSHARE_LOOP", None)  # uvloop, if installed
        agent = Agent(conn, specs)
    except BaseException as exc:
        conn.send(("fatal", describe(exc)))
        return
    conn.send(("started", os.getpid()))
    agent.run()
