"""The core contract on real processes, real sockets and a real TCP upstream."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import pytest

from connshare import (
    CallTimeoutError,
    ChannelNotFoundError,
    ClientClosedError,
    ConcurrencyError,
    ConfigurationError,
    LeaderNotFoundError,
    RemoteError,
    cluster,
)
from tests.clients import AppError, CounterClient, KVClient
from tests.conftest import kv_spec
from tests.harness import AgentError, Worker, wait_until


def test_four_processes_share_one_upstream_connection(port, upstream, spawn) -> None:
    ws = spawn(*[[kv_spec(port, upstream.port)] for _ in range(4)])
    roles = [w.ready() for w in ws]
    leaders = [r for r in roles if r["is_leader"]]
    assert len(leaders) == 1
    leader_pid = leaders[0]["pid"]
    assert all(r["leader_pid"] == leader_pid for r in roles)
    assert upstream.total_connections == 1 and upstream.live_connections == 1
    upstream.set("k", "v1")
    # every process gets the result of a blocking call that runs in the leader
    for w in ws:
        assert w.call("get", "k") == "v1"
        assert w.call("whoami") == leader_pid
    assert upstream.total_connections == 1


def test_fan_out_and_last_value_replay(port, upstream, spawn) -> None:
    ws = spawn(*[[kv_spec(port, upstream.port)] for _ in range(4)])
    for w in ws:
        w.ready()
    upstream.set("cfg", 1)
    for w in ws[:3]:
        w.subscribe({"key": "cfg"}, "cfg")
    for w in ws[:3]:
        w.wait_event("cfg", lambda v: v["value"] == 1)
    # the leader subscribed upstream once for three processes
    assert upstream.watcher_count("cfg") == 1
    upstream.set("cfg", 2)
    for w in ws[:3]:
        w.wait_event("cfg", lambda v: v["value"] == 2)
    # a late subscriber gets the last value at once, without a new upstream watch
    ws[3].subscribe({"key": "cfg"}, "late")
    v, _ = ws[3].wait_event("late", timeout=5)
    assert v["value"] == 2
    assert upstream.watcher_count("cfg") == 1


def test_one_wire_subscription_per_key_per_process(port, upstream, spawn) -> None:
    leader, follower = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    leader.ready()
    follower.ready()
    if follower.role()["is_leader"]:
        leader, follower = follower, leader
    follower.subscribe({"key": "a"}, "first")
    follower.subscribe({"key": "a"}, "second")
    upstream.set("a", "x")
    follower.wait_event("first", lambda v: v["value"] == "x")
    follower.wait_event("second", lambda v: v["value"] == "x")
    assert upstream.watcher_count("a") == 1


@pytest.mark.parametrize("method", ["subscribe", "asubscribe"])
@pytest.mark.parametrize("where", ["leader", "follower"])
def test_a_subscription_the_real_client_refused_can_be_made_again(port, upstream, spawn, where: str, method: str) -> None:
    # asubscribe is a coroutine: it fails after the leader answered the subscriber
    ws = spawn(*[[kv_spec(port, upstream.port)] for _ in range(3)])
    for w in ws:
        w.ready()
    leader = next(w for w in ws if w.role()["is_leader"])
    followers = [w for w in ws if w is not leader]
    w = leader if where == "leader" else followers[0]
    bystander = followers[1]
    bystander.subscribe({"key": "marker"}, "marker")
    reg = {"key": "r", "refuse_once": True}
    w.request("subscribe", "0", reg, "first", False, method)
    wait_until(lambda: w.request("errors", "0"), what="the refusal")
    assert [e["type"] for e in w.request("errors", "0")] == ["ValueError"]
    w.request("subscribe", "0", reg, "again", False, method)  # asks the real client again
    upstream.set("r", "x")
    w.wait_event("again", lambda v: v["value"] == "x")
    assert upstream.watcher_count("r") == 1
    # Only the subscriber heard of it: the marker's value left the leader after the error did.
    upstream.set("marker", "m")
    bystander.wait_event("marker", lambda v: v["value"] == "m")
    assert bystander.request("errors", "0") == []
    assert where == "leader" or leader.request("errors", "0") == []


def test_unsubscribe_stops_events_and_releases_upstream(port, upstream, spawn) -> None:
    a, b = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    a.ready()
    b.ready()
    a.subscribe({"key": "u"}, "u")
    b.subscribe({"key": "u"}, "u")
    upstream.set("u", 1)
    a.wait_event("u", lambda v: v["value"] == 1)
    b.wait_event("u", lambda v: v["value"] == 1)
    a.request("unsubscribe", "0", {"key": "u"})
    upstream.set("u", 2)
    b.wait_event("u", lambda v: v["value"] == 2)
    b.request("unsubscribe", "0", {"key": "u"})
    assert upstream.wait_for(lambda s: s.watcher_count("u") == 0, 10)
    upstream.set("u", 3)
    # a marker event after the change proves nothing more was delivered for "u"
    a.subscribe({"key": "marker"}, "m")
    upstream.set("marker", "done")
    a.wait_event("m", lambda v: v["value"] == "done")
    assert [v["value"] for v in a.values("u")] == [None, 1] or [v["value"] for v in a.values("u")][-1] == 1
    assert all(v["value"] != 3 for v in a.values("u") + b.values("u"))


def test_publish_reaches_upstream_from_every_process(port, upstream, spawn) -> None:
    ws = spawn(*[[kv_spec(port, upstream.port)] for _ in range(3)])
    for i, w in enumerate(ws):
        w.ready()
        w.request("publish", "0", {"service": "me", "n": i})
    assert upstream.wait_for(lambda s: len(s.published()) == 3, 10)
    assert sorted(p["n"] for p in upstream.published()) == [0, 1, 2]
    assert upstream.total_connections == 1


def test_invoke_results_and_exceptions_cross_as_if_local(port, upstream, spawn) -> None:
    leader, follower = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    leader.ready()
    follower.ready()
    if follower.role()["is_leader"]:
        leader, follower = follower, leader
    assert follower.call("echo", {"a": [1, 2.5, None, b"\x00", "é"]}) == {"a": [1, 2.5, None, b"\x00", "é"]}
    # a class loaded in the caller comes back as itself, with its args
    with pytest.raises(AgentError) as info:
        follower.call("boom", "key")
    assert info.value.type == "KeyError" and info.value.desc["args"] == ["missing", 42]
    assert "in boom" in info.value.desc["remote_traceback"] and info.value.desc["cause"] == "RemoteTraceback"
    with pytest.raises(AgentError) as info:
        follower.call("boom", "app")
    assert info.value.type == "AppError" and info.value.desc["args"] == ["bad thing", 7]
    # a class only the leader has loaded: RemoteError naming the remote type
    with pytest.raises(AgentError) as info:
        follower.call("boom", "unknown")
    assert info.value.type == "RemoteError"
    assert "tests.leader_only.LeaderOnlyError" in info.value.desc["message"]
    assert "LeaderOnlyError" in info.value.desc["remote_traceback"]
    with pytest.raises(AgentError) as info:
        follower.request("acall", "0", "aboom", [])
    assert info.value.type == "AppError"
    # the leader's own call raises the real exception directly
    with pytest.raises(AgentError) as info:
        leader.call("boom", "app")
    assert info.value.type == "AppError"


def test_call_timeout_is_a_timeout_error(port, upstream, spawn) -> None:
    leader, follower = spawn([kv_spec(port, upstream.port, response_timeout=0.3)], [kv_spec(port, upstream.port, response_timeout=0.3)])
    leader.ready()
    follower.ready()
    if follower.role()["is_leader"]:
        leader, follower = follower, leader
    with pytest.raises(AgentError) as info:
        follower.request("timed_call", "0", "sleep", [2])
    assert info.value.isa("CallTimeoutError") and info.value.isa("TimeoutError")
    res, _took = follower.request("timed_call", "0", "echo", [1])
    assert res == 1
    # awaited calls time out in the follower and in the leader itself; the leader's
    # own blocking calls run inline, like any local call
    for w in (leader, follower):
        with pytest.raises(AgentError) as info:
            w.request("acall", "0", "asleep", [2])
        assert info.value.isa("CallTimeoutError")


# lend=False: the path an asyncio without _enter_task takes (a Task per call)
@pytest.mark.parametrize(
    ("lend", "op"),
    [(True, "invoke"), (False, "invoke"), (True, "acall"), (False, "acall")],
    ids=["blocking-lent_task", "blocking-task_per_call", "awaited-lent_task", "awaited-task_per_call"],
)
def test_the_leaders_own_call_of_a_coroutine_method_from_another_thread(port, upstream, spawn, lend, op) -> None:
    # The leader's own caller on another thread (a blocking one, or a coroutine on
    # the app's loop, as under uvicorn) hands the call to connshare's loop and waits
    # on a lock or a future of its own loop: results, errors, a context and a task
    # of its own per call, and a timeout that cancels the call on the loop.
    delegates = ["aecho", "aboom", "acontext", "asleep_noting", "noted"]
    w = spawn([kv_spec(port, upstream.port, delegates=delegates, response_timeout=0.3)])[0]
    w.ready()
    assert w.role()["is_leader"]
    if not lend:
        w.request("runner_without_lending")
    assert w.request(op, "0", "aecho", ["x"]) == "x"
    with pytest.raises(AgentError) as info:
        w.request(op, "0", "aboom", [])
    assert info.value.type == "AppError"  # the method's own exception, raised here
    assert w.request(op, "0", "acontext", [1]) is None
    assert w.request(op, "0", "acontext", [2]) is None  # the first call's value stayed in its context
    assert w.request(op, "0", "asleep_noting", [0.05, "early"]) == 0.05  # one that waits
    t0 = time.monotonic()
    with pytest.raises(AgentError) as info:
        w.request(op, "0", "asleep_noting", [30, "gave up"])
    assert info.value.isa("CallTimeoutError") and time.monotonic() - t0 < 10
    wait_until(lambda: w.call("noted") == ["gave up"], what="the timed-out call to be cancelled on the loop")
    if op == "acall":  # a caller cancelled on its own loop cancels the call too
        assert w.request("acall_cancelled", "0", "asleep_noting", [30, "cancelled"], 0.05) is True
        wait_until(lambda: w.call("noted") == ["gave up", "cancelled"], what="the caller's cancel to reach the call")
    assert w.request(op, "0", "aecho", ["after"]) == "after"


def test_the_leaders_own_awaited_calls_wait_in_place_on_an_idle_loop(port, upstream, spawn) -> None:
    # The app's loop, with nothing else to run, waits for the outcome on a lock,
    # and the await completes without a loop pass; at least every 16 such calls it
    # yields. Outcomes that come as a wait gives up reach their callers once.
    w = spawn([kv_spec(port, upstream.port, delegates=["aecho", "asleep"], wait_in_place=0.005)])[0]
    w.ready()
    assert w.role()["is_leader"]
    out = w.request("acalls_counting_loop_passes", "0", "aecho", ["x"], 170)
    assert out["ok"]
    assert 170 // 17 <= out["passes"] < 170 // 2, out
    out = w.request("acall_with_timer", "0", "asleep", [0.6], 0.2)
    assert out == {"result": 0.6, "timer_fired_during_call": True}, "the wait in place is bounded"
    assert w.request("acalls_straddling", "0", 600, 0.005, timeout=150) == {"ok": 600, "bad": []}


@pytest.mark.parametrize("leads", [True, False])
def test_a_wait_in_place_over_before_it_starts_yields(port, upstream, spawn, leads) -> None:
    # 1 ns: the wait has ended by the time the call would start it.
    specs = [kv_spec(port, upstream.port, delegates=["aecho"], wait_in_place=1e-9)]
    workers = spawn(specs) if leads else spawn(specs, specs)
    for w in workers:
        w.ready()
    (w,) = [w for w in workers if w.role()["is_leader"] is leads]
    out = w.request("acalls_counting_loop_passes", "0", "aecho", ["x"], 50)
    assert out["ok"], out


def test_the_leaders_own_awaited_calls_yield_with_wait_in_place_off(port, upstream, spawn) -> None:
    w = spawn([kv_spec(port, upstream.port, delegates=["aecho"], wait_in_place=0)])[0]
    w.ready()
    assert w.role()["is_leader"]
    out = w.request("acalls_counting_loop_passes", "0", "aecho", ["x"], 170)
    assert out["ok"] and out["passes"] >= 170, out


def test_the_leaders_own_awaited_call_times_out_while_connshares_loop_is_stuck(port, upstream, spawn) -> None:
    # The deadline of a call awaited on the app's loop is kept on that loop: a real
    # client that blocks connshare's loop must not hold the caller past it. Calls
    # before it leave that loop's one expiry timer set for an earlier deadline.
    w = spawn([kv_spec(port, upstream.port, delegates=["aecho", "astall"], response_timeout=0.5)])[0]
    w.ready()
    assert w.role()["is_leader"]
    for i in range(3):
        assert w.request("acall", "0", "aecho", [i]) == i
    t0 = time.monotonic()
    with pytest.raises(AgentError) as info:
        w.request("acall", "0", "astall", [3.0])
    took = time.monotonic() - t0
    assert info.value.isa("CallTimeoutError"), info.value
    assert took < 2.0, f"the await ended after {took:.2f} s, with connshare's loop stuck for 3 s"

    def answers_again() -> bool:
        try:
            return w.request("acall", "0", "aecho", ["after"]) == "after"
        except AgentError as exc:  # calls made while the loop is still stuck time out too
            assert exc.isa("CallTimeoutError"), exc
            return False

    wait_until(answers_again, what="calls to be answered once connshare's loop is free")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
@pytest.mark.parametrize("lend", [True, False], ids=["lent_task", "task_per_call"])
def test_coroutine_methods_run_as_in_their_own_task(port, upstream, spawn, lend) -> None:
    # The leader runs coroutine calls that do not wait without a Task each; what a
    # method sees must not tell: its own context, a current task, working timeouts.
    delegates = ["atimeout", "acontext", "asleep", "aecho"]
    a, b = spawn([kv_spec(port, upstream.port, delegates=delegates)], [kv_spec(port, upstream.port, delegates=delegates)])
    a.ready()
    b.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    if not lend:
        leader.request("runner_without_lending")
    out = follower.request(
        "acalls_at_once",
        [
            ["0", "acontext", [1]],
            ["0", "acontext", [2]],
            ["0", "atimeout", [0, 0.2]],  # done at once: its timeout must not fire later
            ["0", "asleep", [0.6]],  # on in the task the timeout above ran in
            ["0", "atimeout", [5.0, 0.2]],  # times out inside the method
            ["0", "atimeout", [0.05, 5.0]],
            ["0", "acontext", [3]],
            ["0", "aecho", ["after"]],
        ],
        10.0,
    )
    want = [None, None, "done", 0.6, "timed out", "done", None, "after"]
    assert [tuple(x) for x in out] == [("ok", w) for w in want]


@pytest.mark.parametrize("how", ["call", "acall"])
def test_a_coroutine_call_that_timed_out_is_cancelled_on_the_leader(port, upstream, spawn, how: str) -> None:
    # Its caller has given up: left running, it would hold its place among the
    # calls in flight until it ended, and against a hung upstream, never.
    opts = {"response_timeout": 0.5, "max_inflight_per_follower": 2}
    a, b = spawn([kv_spec(port, upstream.port, **opts)], [kv_spec(port, upstream.port, **opts)])
    a.ready()
    b.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    for _ in range(3):  # more than max_inflight_per_follower
        with pytest.raises(AgentError) as info:
            follower.request(how, "0", "asleep", [600])
        assert info.value.isa("CallTimeoutError"), info.value.desc
    wait_until(lambda: leader.request("inflight", "0") == 0, what="the calls cancelled on the leader")
    assert follower.request(how, "0", "aecho", ["ok"]) == "ok"


def test_a_coroutine_call_whose_caller_was_cancelled_is_cancelled_on_the_leader_at_once(port, upstream, spawn) -> None:
    # asyncio.wait_for, a task group, a request handler whose client went away: the
    # follower's caller is cancelled. The leader stops the call then, not at its
    # timeout (two minutes here), and its place among the calls in flight is free.
    opts = {"response_timeout": 120, "max_inflight_per_follower": 1}
    delegates = ["asleep_noting", "noted", "aecho"]
    a, b = spawn([kv_spec(port, upstream.port, delegates=delegates, **opts)], [kv_spec(port, upstream.port, delegates=delegates, **opts)])
    a.ready()
    b.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    for i in range(2):
        assert follower.request("acall_cancelled", "0", "asleep_noting", [600, i], 0.2) is True
        wait_until(lambda i=i: leader.call("noted") == list(range(i + 1)), timeout=10, what="the call to be cancelled on the leader")
        wait_until(lambda: leader.request("inflight", "0") == 0, timeout=10, what="the call's place to be free")
        assert follower.request("acall", "0", "aecho", ["ok"]) == "ok"
    # the usual retry: the next call leaves right after the cancelled one's CANCEL
    assert follower.request("acalls_cut_short", "0", "asleep_noting", [600, "cut"], 30, 0.02) == {"cut": 30, "next ok": 30}
    wait_until(lambda: leader.call("noted") == [0, 1, *["cut"] * 30], timeout=10, what="every call cut short to be cancelled")
    assert follower.request("pending", "0") == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10's wait_for cannot tell its own timeout from a method's")
@pytest.mark.parametrize("role", ["leader", "follower", "single"])
def test_stopiteration_and_a_methods_own_timeout_reach_every_caller_as_they_would_locally(port, upstream, spawn, role: str) -> None:
    # StopIteration: a blocking caller gets it; an awaiting one gets the
    # RuntimeError a coroutine raises in its place. (An asyncio future refuses
    # StopIteration: the await hung, and a follower's connection broke.) A
    # TimeoutError the method raises is the method's, not connshare's
    # CallTimeoutError, on whichever loop the caller awaits.
    delegates = ["first", "aown_timeout", "aecho"]
    if role == "single":
        (w,) = spawn([kv_spec(port, upstream.port, delegates=delegates, single_mode=True)])
        w.ready()
    else:
        a, b = spawn([kv_spec(port, upstream.port, delegates=delegates)], [kv_spec(port, upstream.port, delegates=delegates)])
        a.ready()
        b.ready()
        w = a if a.role()["is_leader"] == (role == "leader") else b
    conn = w.request("conn_id", "0")
    with pytest.raises(AgentError) as info:
        w.request("invoke", "0", "first", [[]])
    assert info.value.type == "StopIteration"
    for op in ("ainvoke", "ainvoke_on_connshare_loop"):
        with pytest.raises(AgentError) as info:
            w.request(op, "0", "first", [[]])
        assert (info.value.type, info.value.desc["cause"]) == ("RuntimeError", "StopIteration"), (op, info.value.desc)
        with pytest.raises(AgentError) as info:
            w.request(op, "0", "aown_timeout", [])
        assert info.value.type == "TimeoutError", (op, info.value.desc)
    assert w.request("ainvoke", "0", "aecho", ["after"]) == "after"
    assert w.request("conn_id", "0") == conn


def test_a_call_that_cancels_its_task_loses_no_other_call(port, upstream, spawn) -> None:
    # Calls that do not wait run in a task the leader lends them. A call that
    # cancels that task must not take down the call handed to it next (after the
    # first sleep takes the task, a new one is parked for the rest), nor later calls.
    delegates = ["acancel_self", "asleep", "aecho"]
    a, b = spawn([kv_spec(port, upstream.port, delegates=delegates)], [kv_spec(port, upstream.port, delegates=delegates)])
    a.ready()
    b.ready()
    follower = b if a.role()["is_leader"] else a
    calls = [["0", "asleep", [0.05]], ["0", "acancel_self", []], ["0", "asleep", [0.05]], ["0", "aecho", ["after"]]]
    for _ in range(2):  # the second time, the lent task has been parked a while
        out = [tuple(x) for x in follower.request("acalls_at_once", calls, 10.0)]
        assert out[0] == ("ok", 0.05) and out[1] == ("ok", "cancelled its task") and out[3] == ("ok", "after"), out
        # the sleep handed to the cancelled task fails at once, as a cancelled call
        assert out[2] == ("ok", 0.05) or (out[2][0] == "raised" and out[2][2] < 5.0), out
    assert follower.request("acall", "0", "asleep", [0.05]) == 0.05


def test_oneway_returns_at_once(port, upstream, spawn) -> None:
    ws = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    for w in ws:
        w.ready()
    for w in ws:
        res, took = w.request("timed_call", "0", "bump", [1])
        assert res is None and took < 0.15  # bump() itself sleeps 0.2 s
    wait_until(lambda: ws[0].call("bumps") == 2, what="both oneway calls to run")


def test_two_channels_share_one_port(port, upstream, spawn) -> None:
    def specs() -> list:
        return [
            kv_spec(port, upstream.port),
            {"id": "c", "cls": "CounterClient", "options": {"port": port, "name": "counter"}, "delegates": ["incr", "whoami"]},
        ]

    ws = spawn(specs(), specs(), specs())
    roles = [(w.ready("0"), w.ready("c")) for w in ws]
    kv_leaders = {r[0]["leader_pid"] for r in roles}
    counter_leaders = {r[1]["leader_pid"] for r in roles}
    assert kv_leaders == counter_leaders and len(kv_leaders) == 1
    assert sorted(w.call("incr", cid="c") for w in ws) == [1, 2, 3]
    assert upstream.total_connections == 1


def test_unhosted_channel_fails_after_max_wait_time(port, upstream, spawn) -> None:
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    spec = {
        "id": "0",
        "cls": "CounterClient",
        "options": {"port": port, "name": "nobody-hosts-me", "max_wait_time": 0.5},
        "delegates": ["incr"],
    }
    (follower,) = spawn([spec])
    t0 = time.monotonic()
    with pytest.raises(AgentError) as info:
        follower.ready(timeout=10)
    assert info.value.type == "NotReadyError" and info.value.desc["cause"] == "ChannelNotFoundError"
    assert time.monotonic() - t0 < 5
    with pytest.raises(AgentError) as info:
        follower.call("incr")
    assert info.value.isa("ChannelNotFoundError")


def _later_spec(port: int, **options: Any) -> dict[str, Any]:
    return {"id": "c", "cls": "CounterClient", "options": {"port": port, "name": "later", **options}, "delegates": ["incr"]}


def test_a_channel_the_leader_creates_later_is_served_then(port, upstream, spawn) -> None:
    # An app that makes a client on first use: a follower asked for it before the
    # leader's process had one. It hears so after max_wait_time, and is served
    # once the leader's process creates it, with no new leader.
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port), _later_spec(port, max_wait_time=0.5)])
    with pytest.raises(AgentError) as info:
        follower.ready("c", timeout=10)
    assert info.value.type == "NotReadyError" and info.value.desc["cause"] == "ChannelNotFoundError"
    with pytest.raises(AgentError) as info:
        follower.call("incr", cid="c")
    assert info.value.isa("ChannelNotFoundError") and "still waiting" in info.value.desc["message"]
    leader.request("create", _later_spec(port))
    leader.ready("c")
    assert wait_until(lambda: follower.role("c")["leader_pid"] == leader.pid and _served(follower), what="the follower served")
    assert leader.call("incr", cid="c") == 2
    assert [e["type"] for e in follower.request("errors", "c")] == ["ChannelNotFoundError"]  # once
    assert follower.role("c")["is_leader"] is False


def _served(w: Worker) -> bool:
    try:
        return w.call("incr", cid="c") == 1
    except AgentError as exc:
        assert exc.isa("ChannelNotFoundError"), exc.desc
        return False


def test_a_leader_leaving_answers_registrations_waiting_for_a_channel(port, upstream, spawn) -> None:
    # A follower waits for a channel the leader's process has not created; the
    # leader's graceful close must not wait for it (its grace is up to 10 s).
    (leader,) = spawn([kv_spec(port, upstream.port)])
    leader.ready()
    (follower,) = spawn([kv_spec(port, upstream.port), _later_spec(port, max_wait_time=60)])
    follower.ready()
    wait_until(lambda: leader.request("registrations_waiting", "0") == 1, what="the REGISTER held by the leader")
    t0 = time.monotonic()
    leader.request("close", "0")
    assert time.monotonic() - t0 < 5
    # The follower leads now, and hosts the channel its own process created.
    assert follower.ready("c", timeout=20)["is_leader"] is True
    assert follower.call("incr", cid="c") == 1


def test_another_apps_client_under_the_same_name_is_refused_at_once(port, upstream, spawn) -> None:
    # Two apps on one port, each with a client called "kv": the second must not be
    # handed the first one's real client, and need not wait max_wait_time to hear so.
    a, b = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    a.ready()
    b.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    # max_wait_time far beyond ready()'s timeout: only a refusal at once is in time
    other = {"id": "0", "cls": "CounterClient", "options": {"port": port, "name": "kv", "max_wait_time": 600}, "delegates": ["incr"]}
    (stranger,) = spawn([other])
    with pytest.raises(AgentError) as info:
        stranger.ready(timeout=20)
    assert info.value.type == "NotReadyError" and info.value.desc["cause"] == "ChannelNotFoundError", info.value.desc
    with pytest.raises(AgentError) as info:
        stranger.call("incr")
    assert info.value.isa("ChannelNotFoundError")
    assert "is a KVClient, not a CounterClient" in info.value.desc["message"]
    # the leader goes on serving its own app
    assert follower.call("echo", "still") == "still"
    assert any("as a CounterClient" in w for w in leader.request("warnings"))


def test_two_classes_under_one_name_in_one_process_are_refused(port, upstream) -> None:
    first = cluster(KVClient, port=port, name="kv", single_mode=True).delegate("echo").create(upstream.port)
    try:
        with pytest.raises(ConfigurationError, match="is a KVClient in this process; a CounterClient needs a name of its own"):
            cluster(CounterClient, port=port, name="kv", single_mode=True).create()
        assert first.echo(1) == 1
    finally:
        first.close()


def test_a_method_that_was_not_delegated_says_how_to_delegate_it(port, upstream) -> None:
    c = cluster(KVClient, port=port, single_mode=True).delegate("echo").create(upstream.port)
    try:
        with pytest.raises(AttributeError, match=r"KVClient.get is not delegated \(add .delegate\('get'\)"):
            c.get("k")
        with pytest.raises(AttributeError, match=r"has no attribute 'nothing_of_the_kind'$"):
            c.nothing_of_the_kind  # noqa: B018
        assert not hasattr(c, "get") and c.echo(1) == 1
    finally:
        c.close()


def test_an_awaited_blocking_call_after_its_loops_executor_shut_down_is_a_typed_error(port, upstream) -> None:
    # The leader's own awaited call of a blocking method runs on the caller loop's
    # executor; once that is shut down (the process exiting), it fails as closed,
    # not with a bare RuntimeError from concurrent.futures.
    c = cluster(KVClient, port=port, single_mode=True).delegate("echo").create(upstream.port)

    async def go() -> None:
        assert await c.ainvoke("echo", 1) == 1
        await asyncio.get_running_loop().shutdown_default_executor()
        with pytest.raises(ClientClosedError, match="executor is shut down"):
            await c.ainvoke("echo", 2)

    try:
        asyncio.run(go())
    finally:
        c.close()


def test_forced_follower_without_leader_raises(port) -> None:
    c = cluster(KVClient, port=port, is_leader=False, max_wait_time=0.3).delegate("echo").create(0)
    try:
        with pytest.raises(Exception) as info:
            c.wait_ready(5)
        assert isinstance(info.value.__cause__, LeaderNotFoundError)
    finally:
        c.close()


@pytest.mark.parametrize("awaited", [False, True])
def test_a_call_made_as_a_forced_follower_finds_no_leader_raises_leader_not_found(port, awaited) -> None:
    # The call's wait for a route ends with the election's own deadline: it must
    # get the election's verdict, not a CallTimeoutError that hides why.
    c = cluster(KVClient, port=port, is_leader=False, max_wait_time=0.5).delegate("echo").create(0)
    try:
        with pytest.raises(LeaderNotFoundError):
            if awaited:
                asyncio.run(c.ainvoke("echo", 1))
            else:
                c.echo(1)
        with pytest.raises(LeaderNotFoundError):  # and every call after it
            c.echo(2)
    finally:
        c.close()


def test_blocking_and_asyncio_callers(port, upstream, spawn) -> None:
    leader, follower = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    leader.ready()
    follower.ready()
    for w in (leader, follower):
        assert w.call("echo", 5) == 5  # blocking proxy
        assert w.request("acall", "0", "aecho", [6]) == 6  # awaitable proxy
        assert w.request("invoke", "0", "aecho", [7]) == 7  # blocking call of a coroutine method
        assert w.request("ainvoke", "0", "echo", [8]) == 8  # awaited call of a blocking method
        # coroutine methods run on connshare's loop, the one that built the client
        assert w.request("acall", "0", "loop_id", []) is True


def test_listener_runs_on_the_loop_it_was_registered_from(port, upstream, spawn) -> None:
    ws = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    for w in ws:
        w.ready()
        w.subscribe({"key": "L"}, "in-loop", in_loop=True)
        w.subscribe({"key": "L"}, "plain")
        w.subscribe({"key": "L"}, "ended-loop", in_loop="ended")
    upstream.set("L", 1)
    for w in ws:
        _, meta = w.wait_event("in-loop", lambda v: v["value"] == 1)
        assert meta["on_agent_loop"] is True
        _, meta = w.wait_event("plain", lambda v: v["value"] == 1)
        assert meta["on_agent_loop"] is False and meta["thread"] == "connshare-loop"
        # its loop is gone (an asyncio.run() that ended): connshare's loop runs it
        _, meta = w.wait_event("ended-loop", lambda v: v["value"] == 1)
        assert meta["thread"] == "connshare-loop"


def test_blocking_call_on_connshares_thread_raises(port, upstream, spawn) -> None:
    ws = spawn([kv_spec(port, upstream.port)], [kv_spec(port, upstream.port)])
    for w in ws:
        w.ready()
        w.request("subscribe_calling", "0", {"key": "B"}, "B")
    upstream.set("B", 1)
    for w in ws:
        v, _ = w.wait_event("B")
        assert "ConcurrencyError" in v


def test_broadcast_false_delivers_each_value_to_one_process(port, upstream, spawn) -> None:
    ws = spawn(*[[kv_spec(port, upstream.port, is_broadcast=False)] for _ in range(3)])
    for w in ws:
        w.ready()
        w.subscribe({"key": "q"}, "q")
    wait_until(lambda: upstream.watcher_count("q") == 1)

    def got(w) -> list:
        return [v["value"] for v in w.values("q") if v["value"] is not None]

    # keep changing the value until every process has had one (each subscription
    # reaches the leader at its own pace)
    sent = 0
    deadline = time.monotonic() + 20
    while not all(got(w) for w in ws):
        assert time.monotonic() < deadline, [got(w) for w in ws]
        sent += 1
        upstream.set("q", sent)
        wait_until(lambda n=sent: any(n in got(w) for w in ws), what=f"value {sent} delivered")
    delivered = sorted(v for w in ws for v in got(w))
    assert delivered == list(range(1, sent + 1))  # each value to exactly one process


def test_subscribe_timeout_reports_an_error(port, spawn) -> None:
    spec = {
        "id": "0",
        "cls": "CounterClient",
        "options": {"port": port, "name": "silent", "subscribe_timeout": 0.2},
        "delegates": [["watch", "subscribe"]],
    }
    ws = spawn([spec], [spec])
    for w in ws:
        w.ready()
        w.request("subscribe", "0", {"k": 1}, "never", False, "watch")
    for w in ws:
        errs = wait_until(lambda w=w: w.request("errors", "0"), what="subscribe_timeout error")
        assert "CallTimeoutError" in errs[0]["mro"] and "subscribe_timeout" in errs[0]["message"]


def test_leader_process_calls_locally_and_from_a_foreign_loop(port, upstream) -> None:
    c = (
        cluster(KVClient, port=port, name="kv")
        .delegate("echo")
        .delegate("aecho")
        .delegate("loop_id")
        .delegate("boom")
        .create(upstream.port)
    )
    try:
        c.wait_ready(10)
        assert c.is_leader and c.role == "leader"
        assert c.echo("x") == "x"
        with pytest.raises(AppError):
            c.boom("app")

        async def main() -> tuple:
            return await c.aecho(1), await c.loop_id()

        assert asyncio.run(main()) == (1, True)
        assert asyncio.run(c.ainvoke("echo", 2)) == 2
    finally:
        c.close()
    assert c.closed


def test_remote_error_type_for_unknown_classes() -> None:
    from connshare._protocol import Error, ErrorCode
    from connshare._remote import exception_from

    exc = exception_from(Error(1, ErrorCode.RAISED, "nowhere.mod:Odd", "odd", ["odd"], "tb"))
    assert isinstance(exc, RemoteError) and exc.type_name == "nowhere.mod.Odd"
    # a class that is loaded but is not an exception is never instantiated
    exc = exception_from(Error(1, ErrorCode.RAISED, "os:system", "x", ["echo hi"], "tb"))
    assert isinstance(exc, RemoteError)
    assert isinstance(exception_from(Error(1, ErrorCode.TIMEOUT, "x:y", "slow", [], "")), CallTimeoutError)
    assert isinstance(exception_from(Error(1, ErrorCode.NO_CHANNEL, "x:y", "none", [], "")), ChannelNotFoundError)
    assert issubclass(ConcurrencyError, RuntimeError)


def test_blocking_methods_run_on_workers_unless_delegated_inline(port, upstream, spawn) -> None:
    delegates = ["thread_name", ["thread_name_inline", "invoke", {"inline": True}]]
    leader, follower = spawn([kv_spec(port, upstream.port, delegates=delegates)], [kv_spec(port, upstream.port, delegates=delegates)])
    leader.ready()
    follower.ready()
    if follower.role()["is_leader"]:
        leader, follower = follower, leader
    assert follower.call("thread_name").startswith("connshare-worker")
    assert follower.call("thread_name_inline") == "connshare-loop"


def test_every_process_hears_of_a_value_the_wire_cannot_carry_in_its_place_among_the_values(port, upstream, spawn) -> None:
    # The follower reads the report and the next value in one recv (stopped while
    # they are sent): the report's listeners ran a loop turn late, after the next
    # value's, and the leader's before the listeners of the value it was about.
    delegates = ["emit_made", "aecho"]
    leader, follower = spawn(
        [kv_spec(port, upstream.port, delegates=delegates, is_leader=True)],
        [kv_spec(port, upstream.port, delegates=delegates, is_leader=False)],
    )
    leader.ready()
    follower.ready()
    leader.subscribe({"key": "k"}, "k")
    follower.subscribe({"key": "k"}, "k")
    for w in (leader, follower):
        w.wait_event("k")  # the upstream's first value: the subscription is live
    follower.kill(signal.SIGSTOP)
    try:
        leader.call("emit_made", "k", "set")
        leader.call("emit_made", "k", "nested")
        leader.call("aecho", 0)  # runs on the leader's loop after both values went out
    finally:
        follower.kill(signal.SIGCONT)

    def seen(w: Worker) -> list[str]:
        w.wait_event("k", lambda v: isinstance(v["value"], dict))
        with w.cond:
            return [v if t == "error:0" else type(v["value"]).__name__ for t, v, _ in w.events if t in ("k", "error:0")]

    assert seen(leader) == ["NoneType", "set", "EncodeError", "dict"]
    assert seen(follower) == ["NoneType", "EncodeError", "dict"]
