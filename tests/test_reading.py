"""A follower's blocking caller reads its own answer off the socket when nobody else
is reading (the background reader stands aside), and an event loop awaiting answers
reads them on its own selector. Whoever reads must deliver every other frame too,
and must hand the socket back however the call ends, or however the loop stalls.
Either side may poll before it sleeps (``spin_wait``, ``leader_spin_wait``)."""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import kv_spec
from tests.harness import blast_until_subscribed, wait_until
from tests.hostile_clients import blast_spec

DELEGATES = ["echo", "aecho", "asize", "asleep", "sleep", "whoami", "emit_then_sleep", "anote", "noted"]


def _pair(spawn, port: int, upstream_port: int, asyncio_loop: bool = False, **options):
    """A leader and a follower; ``asyncio_loop``: connshare's loop is asyncio's in
    both, even where uvloop is installed."""
    loop = {"connshare_loop": "asyncio"} if asyncio_loop else {}
    a, b = spawn(
        [{**kv_spec(port, upstream_port, delegates=DELEGATES, **options), **loop}],
        [{**kv_spec(port, upstream_port, delegates=DELEGATES, **options), **loop}],
    )
    a.ready()
    b.ready()
    return (a, b) if a.role()["is_leader"] else (b, a)


def test_events_reach_listeners_while_a_blocking_caller_reads(port, upstream, spawn) -> None:
    _leader, follower = _pair(spawn, port, upstream.port)
    follower.subscribe({"key": "cfg"}, "cfg")
    upstream.set("cfg", 0)
    follower.wait_event("cfg", lambda v: v["value"] == 0)
    # The call takes the read token before it sends; the event is emitted by the
    # method it runs, so only that caller can read it off the socket.
    follower.request("call_in_thread", "0", "emit_then_sleep", ["cfg", 1, 3.0], "slow")
    follower.wait_event("cfg", lambda v: v["value"] == 1, timeout=10)
    assert follower.request("call_running", "slow"), "the event waited for the call to end"
    assert follower.request("join_call", "slow") == ("ok", 3.0)
    # and the background reader has the socket again
    upstream.set("cfg", 2)
    follower.wait_event("cfg", lambda v: v["value"] == 2)


def test_events_reach_listeners_in_order_whoever_reads_them(port, spawn) -> None:
    # connshare's loop runs the listeners of the events it reads at once; events a
    # blocking caller read are queued to that loop from the caller's thread. The
    # listener must still see every value in order, as the leader emitted them.
    a, b = spawn([blast_spec(port)], [blast_spec(port)])
    a.ready()
    b.ready()
    leader, follower = (a, b) if a.role()["is_leader"] else (b, a)
    follower.request("subscribe", "0", {"key": "k"}, "k")
    first = blast_until_subscribed(leader, [follower])
    follower.wait_event("k", lambda v: v["seq"] == first)
    with ThreadPoolExecutor(1) as pool:
        # blocking callers take the read token in turn with connshare's loop
        hammer = pool.submit(follower.request, "hammer", "0", 8, 1500, 0, timeout=120)
        last = first
        while not hammer.done():
            last = leader.call("blast", "k", 20, 8)
        assert hammer.result() == {"bad": 0, "errors": []}
    follower.wait_event("k", lambda v: v["seq"] == last)
    got = [v["seq"] for v in follower.values("k") if v["seq"] > first]
    assert got == list(range(first + 1, last + 1))


def test_blocking_threads_and_awaitable_calls_share_one_connection(port, upstream, spawn) -> None:
    _leader, follower = _pair(spawn, port, upstream.port)
    out = follower.request("hammer", "0", 8, 300, 20, timeout=180)
    assert out == {"bad": 0, "errors": []}
    follower.subscribe({"key": "k"}, "k")
    upstream.set("k", "after")
    follower.wait_event("k", lambda v: v["value"] == "after")


def _a_caller_reading(spawn, port: int, upstream_port: int):
    """A leader, and a follower subscribed to "k" whose call ``stuck`` (30 s) reads
    the socket, nothing else in flight; and the follower's connection's id."""
    # No heartbeats: nothing arrives while the caller waits.
    leader, follower = _pair(spawn, port, upstream_port, heartbeat_interval=None)
    follower.subscribe({"key": "k"}, "k")
    # the subscription's answer and first value in, or the caller may read them
    # as an interrupt lands (which ends the connection)
    follower.wait_event("k", lambda v: v["value"] is None)
    conn = follower.request("conn_id", "0")
    follower.request("call_in_thread", "0", "sleep", [30.0], "stuck")
    # its frame sent (the leader runs it): an interrupt lands while it reads, not
    # as it sends, which ends the connection (see the mid-send test)
    wait_until(lambda: leader.request("inflight", "0") == 1, 10, what="the call running on the leader")
    return leader, follower, conn


def test_a_caller_interrupted_while_reading_leaves_the_connection_working(port, upstream, spawn) -> None:
    # The interrupt hits the caller between reads: the connection must stay (no
    # reconnect hides a leak). Python 3.10 raises it inside the handler of the read
    # slice's timeout, before connshare knows that nothing was read: there the
    # connection ends, as for any interrupt that may have cut a read short, and
    # the node reconnects.
    stays = sys.version_info >= (3, 11)
    leader, follower, conn_before = _a_caller_reading(spawn, port, upstream.port)
    follower.request("interrupt_call", "stuck")
    status, desc = follower.request("join_call", "stuck", 20)
    assert status == "raised" and desc["type"] == "KeyboardInterrupt"
    if stays:
        assert follower.request("pending", "0") == 0, "the interrupted call is still awaited"
    # whoever reads next has the socket: calls and events still work
    assert follower.call("whoami") == leader.role()["pid"]
    upstream.set("k", "v")
    follower.wait_event("k", lambda v: v["value"] == "v")
    assert (follower.request("conn_id", "0") == conn_before) is stays


@pytest.mark.parametrize("how", ["signal", "interrupt_main"])
def test_ctrl_c_in_a_callers_main_thread_leaves_the_client_working(port, upstream, spawn, how: str) -> None:
    # Python raises KeyboardInterrupt in the main thread. A SIGINT from another
    # process (Ctrl-C) usually ends the caller's recv; _thread.interrupt_main()
    # does not, and the main thread notices at its next check, between reads. On
    # CPython 3.14 that check is a loop's backward jump, which skips the handlers
    # of its frame (python/cpython#130279): while the read loop sat in
    # request_sync's frame, the caller kept the read token and every later call
    # timed out. (An interrupt that ends the recv ends the connection instead, as
    # what the recv read is unknown: the node reconnects.)
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None)
    follower.subscribe({"key": "k"}, "k")
    follower.wait_event("k", lambda v: v["value"] is None)
    conn_before = follower.request("conn_id", "0")
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(follower.request, "call_in_main", "0", "sleep", [30.0], how == "interrupt_main")
        if how == "signal":
            wait_until(lambda: leader.request("inflight", "0") == 1, 10, what="the call running on the leader")
            follower.kill(signal.SIGINT)
        status, desc = call.result(20)
    assert status == "raised" and desc["type"] == "KeyboardInterrupt", desc
    if follower.request("conn_id", "0") == conn_before:
        assert follower.request("pending", "0") == 0, "the interrupted call is still awaited"
    assert follower.call("whoami") == leader.role()["pid"]
    upstream.set("k", "v")
    follower.wait_event("k", lambda v: v["value"] == "v")


def test_a_caller_interrupted_while_another_reads_is_no_longer_awaited(port, upstream, spawn) -> None:
    # A caller that waits while another thread reads for it: interrupted, its
    # request is forgotten, and does not count as in flight until its answer.
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None, response_timeout=3.0)
    follower.request("call_in_thread", "0", "sleep", [30.0], "reader")
    wait_until(lambda: leader.request("inflight", "0") == 1, 10, what="the first call running on the leader")
    follower.request("call_in_thread", "0", "sleep", [30.0], "waiter")
    wait_until(lambda: leader.request("inflight", "0") == 2, 10, what="the second call running on the leader")
    follower.request("interrupt_call", "waiter")
    status, desc = follower.request("join_call", "waiter", 20)
    assert status == "raised" and desc["type"] == "KeyboardInterrupt", desc
    status, desc = follower.request("join_call", "reader", 20)
    assert status == "raised" and desc["type"] == "CallTimeoutError", desc
    assert follower.request("pending", "0") == 0, "the interrupted call is still awaited"


def test_frames_a_caller_read_as_it_was_interrupted_are_not_lost(port, upstream, spawn) -> None:
    # Ctrl-C can land in a reading caller as its recv returns with frames, before
    # they are handled: then the connection ends and the node subscribes again,
    # so the value that read brought still arrives. (Before, it was dropped and
    # the connection went on, so a SUBSCRIBE's answer lost this way left a
    # subscription that heard nothing more.)
    leader, follower, conn_before = _a_caller_reading(spawn, port, upstream.port)
    follower.request("interrupt_after_next_read", "0", "stuck")
    upstream.set("k", "v1")  # the event the stuck caller reads, then is interrupted
    status, desc = follower.request("join_call", "stuck", 20)
    assert status == "raised" and desc["type"] == "KeyboardInterrupt", desc
    follower.wait_event("k", lambda v: v["value"] == "v1")
    assert follower.request("conn_id", "0") != conn_before
    assert follower.call("whoami") == leader.role()["pid"]
    upstream.set("k", "v2")
    follower.wait_event("k", lambda v: v["value"] == "v2")


def test_a_caller_interrupted_mid_send_leaves_no_half_frame(port, upstream, spawn) -> None:
    # Ctrl-C in a caller's send with half its frame out: the next frame would
    # complete the half one as garbage. The connection ends instead, and the next
    # call goes over a new one.
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None)
    conn_before = follower.request("conn_id", "0")
    follower.request("interrupt_mid_send", "0", "cut")
    follower.request("call_in_thread", "0", "echo", ["x" * 1000], "cut")
    status, desc = follower.request("join_call", "cut", 20)
    assert status == "raised" and desc["type"] == "KeyboardInterrupt", desc
    assert follower.call("echo", "y" * 1000) == "y" * 1000
    assert follower.request("conn_id", "0") != conn_before
    assert leader.request("warnings") == [], "the leader read a broken frame"


def test_a_reading_caller_sees_the_leader_die(port, upstream, spawn) -> None:
    leader, follower = _pair(spawn, port, upstream.port)
    follower.request("call_in_thread", "0", "sleep", [30.0], "inflight")
    wait_until(lambda: follower.request("call_running", "inflight"), 10)
    leader.kill(9)
    status, desc = follower.request("join_call", "inflight", 20)
    assert status == "raised" and desc["type"] == "LeaderLostError", desc
    # the survivor leads now, and its own calls work
    wait_until(lambda: follower.role()["is_leader"], 10)
    assert follower.call("echo", 5) == 5


def test_a_stalled_event_loop_does_not_hold_up_other_callers(port, upstream, spawn) -> None:
    # Heartbeats every 0.1 s: a reader late by more than 0.3 s must not make the
    # leader look unresponsive while its answers sit unread.
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=0.1)
    follower.subscribe({"key": "k"}, "k")
    assert follower.request("acall_then_block_loop", "0", "aecho", [1], 8.0) == (1, True)
    assert follower.call("whoami") == leader.role()["pid"]
    upstream.set("k", "meanwhile")
    follower.wait_event("k", lambda v: v["value"] == "meanwhile")
    assert follower.request("loop_blocked"), "the call waited for the blocked loop"
    assert follower.request("errors", "0") == []
    wait_until(lambda: not follower.request("loop_blocked"), 20, what="the loop runs again")
    assert follower.request("acall", "0", "aecho", [2]) == 2


def test_a_blocking_call_on_the_loop_that_reads_reads_for_itself(port, upstream, spawn) -> None:
    # A blocking call inside a coroutine, while that loop reads the connection
    # (an awaited call in flight): the loop cannot read until the call returns, so
    # the caller reads its own answer. Before, it waited for connshare's loop to
    # find the role stalled, 0.5 s and more per call.
    _leader, follower = _pair(spawn, port, upstream.port)
    out = follower.request("blocking_call_on_a_reading_loop", "0", "echo", ["x"])
    assert out["loop_read"], "precondition: the loop held the reader role"
    assert out["result"] == "x"
    assert out["stalls"] == 0, "connshare's loop had to take the role from the blocked loop"
    assert follower.request("acall", "0", "aecho", ["after"]) == "after"


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_closed_event_loop_leaves_the_connection_working(port, upstream, spawn, kind) -> None:
    if kind == "uvloop":
        pytest.importorskip("uvloop")
    _leader, follower = _pair(spawn, port, upstream.port)
    assert follower.request("acall_on_fresh_loop", "0", "aecho", ["a"], kind) == ("a", True)
    # That loop read the answer, then closed: the next blocking call is read by the
    # background or by its caller, which must block in recv, not spin (libuv left
    # the socket non-blocking once).
    result, cpu_s = follower.request("cpu_call", "0", "sleep", [1.0])
    assert result == 1.0
    assert cpu_s < 0.3, f"the caller burned {cpu_s:.2f} s of CPU waiting 1 s for its answer"
    assert follower.call("echo", 5) == 5


def test_requests_queued_when_the_leader_dies_are_sent_to_the_next(port, upstream, spawn) -> None:
    # Calls 1 and 2 leave at once; 3 to 5 wait in the loop turn's queue, which the
    # leader's death cuts short. Those never left, so they must fail as not sent
    # and go to the next leader (this process), not as "in flight, may have run"
    # (anote is not idempotent, so that error would reach the app).
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None)
    out = follower.request("acalls_then_kill_leader", "0", "anote", [[1], [2], [3], [4], [5]], 15.0)
    leader.stop()  # reap it: the follower killed it
    for got, tag in zip(out[:2], (1, 2), strict=True):
        assert tuple(got) in (("ok", tag), ("raised", "LeaderLostError")), out
    assert [tuple(x) for x in out[2:]] == [("ok", 3), ("ok", 4), ("ok", 5)], out
    assert follower.role()["is_leader"]
    noted = follower.call("noted")
    assert {3, 4, 5} <= set(noted) and 1 not in noted, noted


def test_a_caller_waits_for_connshare_to_see_the_leader_go_without_spinning(port, upstream, spawn) -> None:
    # The caller sees the dead leader's end before connshare's loop does (held up
    # here by a slow listener), so its route is stale until that loop moves on. It
    # must wait without burning the CPU and the GIL that loop needs.
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None)
    follower.request("subscribe_sleeper", "0", {"key": "slow"}, 1.5)
    upstream.set("slow", "block")
    wait_until(lambda: follower.request("loop_blocked"), what="connshare's loop to run the slow listener")
    leader.stop()  # SIGKILL, reaped
    result, cpu_s = follower.request("cpu_call", "0", "echo", [5])
    assert result == 5
    assert not follower.request("loop_blocked"), "the call returned before connshare's loop was free"
    assert cpu_s < 0.3, f"the caller burned {cpu_s:.2f} s of CPU waiting for the next leader"
    assert follower.role()["is_leader"]


def test_requests_a_loop_queued_before_it_stalled_still_leave(port, upstream, spawn) -> None:
    # Calls started in one loop turn leave in one send() when the loop comes round;
    # a loop blocked by app code in that same turn must not hold them back. No
    # heartbeats: their sends would carry the queued frames along.
    leader, follower = _pair(spawn, port, upstream.port, heartbeat_interval=None)
    follower.request("acalls_then_block_loop", "0", "anote", [[1], [2], [3]], 6.0)
    assert follower.request("loop_blocked")
    wait_until(lambda: sorted(leader.call("noted")) == [1, 2, 3], 3, what="every request reached the leader")
    assert follower.request("loop_blocked"), "the requests waited for the blocked loop"
    wait_until(lambda: not follower.request("loop_blocked"), 20, what="the loop runs again")
    assert follower.request("acall", "0", "aecho", [2]) == 2


def test_awaited_calls_with_different_timeouts_each_time_out_on_time(port, upstream, spawn) -> None:
    # One expiry timer per event loop: a later call with an earlier deadline (a
    # channel with a shorter response_timeout) must bring that timer forward.
    def specs() -> list:
        return [
            kv_spec(port, upstream.port, delegates=DELEGATES, response_timeout=30.0),
            {**kv_spec(port, upstream.port, delegates=DELEGATES, response_timeout=0.5, name="kv2"), "id": "1"},
        ]

    a, b = spawn(specs(), specs())
    for w in (a, b):
        w.ready()
        w.ready("1")
    follower = b if a.role()["is_leader"] else a
    out = follower.request("acalls_at_once", [["0", "asleep", [20.0]], ["1", "asleep", [20.0]], ["1", "asleep", [0.05]]], 4.0)
    assert tuple(out[0]) == ("pending",), out
    assert tuple(out[1][:2]) == ("raised", "CallTimeoutError"), out
    assert out[1][2] < 3.0, f"the 0.5 s timeout fired after {out[1][2]:.1f} s"
    assert tuple(out[2]) == ("ok", 0.05), out


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_a_loop_that_closed_holding_the_reader_role_hands_it_on_at_once(port, upstream, spawn, kind) -> None:
    # asyncio.run() per request: the loop that read the last answer closes with the
    # reader role. The next caller, on a new loop or blocking, must take the role
    # back itself, not wait for connshare's watch tick (60 s apart here) to do it.
    if kind == "uvloop":
        pytest.importorskip("uvloop")
    _leader, follower = _pair(spawn, port, upstream.port, response_timeout=5.0)
    follower.request("slow_watch", 60.0)
    assert follower.request("acall_on_fresh_loop", "0", "aecho", ["a"], kind) == ("a", True)
    assert follower.request("acall_on_fresh_loop", "0", "aecho", ["b"], kind) == ("b", True)
    result, cpu_s = follower.request("cpu_call", "0", "sleep", [1.0])  # a blocking caller
    assert result == 1.0
    assert cpu_s < 0.3, f"the caller burned {cpu_s:.2f} s of CPU waiting 1 s for its answer"
    assert follower.call("echo", "c") == "c"


def test_many_short_lived_event_loops_are_not_remembered(port, upstream, spawn) -> None:
    # asyncio.run() per request (as async_to_sync does): each loop's awaited call
    # leaves an expiry timer record; closed loops must not pile up.
    _leader, follower = _pair(spawn, port, upstream.port)
    for i in range(15):
        assert follower.request("acall_on_fresh_loop", "0", "aecho", [i])[0] == i
    assert follower.request("loops_remembered", "0") <= 10
    assert follower.call("echo", "still") == "still"


def test_a_burst_of_calls_in_one_loop_turn_all_return(port, upstream, spawn) -> None:
    # Calls started in one turn are queued together; they must leave in bounded
    # pieces, with the answers read in between.
    _leader, follower = _pair(spawn, port, upstream.port)
    assert follower.request("acall_burst", "0", "asize", 2000, 32768, timeout=150) == {"ok": 2000, "errors": []}
    # 64 MiB each way: the answers outgrow the leader's max_buffered_bytes (32 MiB)
    # unless the loop reads them while it is still sending
    assert follower.request("acall_burst", "0", "aecho", 2000, 32768, timeout=150) == {"ok": 2000, "errors": []}


def test_an_awaited_call_on_an_idle_loop_is_answered_in_place(port, upstream, spawn) -> None:
    # wait_in_place: a loop with nothing else to run waits for the answer on its
    # own thread, and the await completes without a loop pass; the loop still runs
    # at least every 16 such calls. (5 ms, not the default 0.2 ms: answers on a
    # busy test host come late, and the wait would turn itself off.)
    _leader, follower = _pair(spawn, port, upstream.port, wait_in_place=0.005)
    out = follower.request("acalls_counting_loop_passes", "0", "aecho", ["x"], 170)
    assert out["ok"]
    assert 170 // 17 <= out["passes"] < 170 // 2, out


def test_with_wait_in_place_off_every_awaited_call_yields_to_the_loop(port, upstream, spawn) -> None:
    _leader, follower = _pair(spawn, port, upstream.port, wait_in_place=None)
    out = follower.request("acalls_counting_loop_passes", "0", "aecho", ["x"], 170)
    assert out["ok"]
    assert out["passes"] >= 170, out


def test_a_slow_answer_is_not_waited_for_in_place(port, upstream, spawn) -> None:
    # The wait is bounded: a timer of the loop due during a slow call fires on
    # time, not once the answer is in.
    _leader, follower = _pair(spawn, port, upstream.port, wait_in_place=0.005)
    for _ in range(3):  # the first call waits in place, and those after it skip
        out = follower.request("acall_with_timer", "0", "asleep", [0.6], 0.2)
        assert out == {"result": 0.6, "timer_fired_during_call": True}
    assert follower.request("acall", "0", "aecho", ["fast"]) == "fast"


def test_answers_that_come_as_an_in_place_wait_ends_reach_their_callers(port, upstream, spawn) -> None:
    # Calls that take about as long as the wait: some answers are read in place,
    # some by the loop after the wait gave up, some as it gives up.
    _leader, follower = _pair(spawn, port, upstream.port, wait_in_place=0.0003)
    assert follower.request("acalls_straddling", "0", 600, 0.0002, timeout=150) == {"ok": 600, "bad": []}


@pytest.mark.parametrize("awaited", [False, True], ids=["blocking", "awaited"])
def test_a_caller_polls_for_its_answer_up_to_spin_wait_then_sleeps(port, upstream, spawn, awaited: bool) -> None:
    # spin_wait: a caller that reads its own answer polls the socket before it
    # sleeps. A slow answer ends the poll, which turns polling off for the next 2
    # calls, and the caller sleeps rather than burn the whole wait; an answer read
    # while polling turns it back on.
    _leader, follower = _pair(spawn, port, upstream.port, spin_wait=0.001, wait_in_place=0.005)
    assert follower.request("spin_state", "0") == {"backoff": 1, "skip": 0}
    if awaited:
        assert follower.request("acall", "0", "asleep", [0.5]) == 0.5
    else:
        result, cpu_s = follower.request("cpu_call", "0", "sleep", [0.5])
        assert result == 0.5
        assert cpu_s < 0.25, f"the caller burned {cpu_s:.2f} s of CPU waiting 0.5 s for its answer"
    assert follower.request("spin_state", "0") == {"backoff": 2, "skip": 2}

    # On a loaded host an answer 1 ms away can miss poll after poll, each miss
    # doubling the calls that skip theirs: calls go on until one is read polling.
    wait_until(
        lambda: follower.request("calls_until_a_poll_answers", "0", awaited, 2000, timeout=60),
        timeout=60,
        what="a quick answer read while polling",
    )


def test_spin_wait_off_means_no_polling(port, upstream, spawn) -> None:
    _leader, follower = _pair(spawn, port, upstream.port)  # the default
    assert follower.request("spin_state", "0") is None
    assert follower.call("echo", 1) == 1


POLLS = {
    "follower": {"spin_wait": 0.0003},
    # the leader's loop polls too: a request may come as its poll ends
    "both": {"spin_wait": 0.0003, "leader_spin_wait": 0.0003, "asyncio_loop": True},
}


@pytest.mark.parametrize("polls", list(POLLS))
@pytest.mark.parametrize("awaited", [False, True], ids=["blocking", "awaited"])
def test_answers_and_events_that_come_as_a_poll_ends_reach_their_callers(port, upstream, spawn, awaited: bool, polls: str) -> None:
    # Calls that take about as long as the poll: some answers are read while
    # polling, some after it gave up, some as it gives up; an event that comes
    # during a poll still reaches its listener.
    _leader, follower = _pair(spawn, port, upstream.port, wait_in_place=0.005, **POLLS[polls])
    op = "acalls_straddling" if awaited else "calls_straddling"
    assert follower.request(op, "0", 600, 0.0002, timeout=150) == {"ok": 600, "bad": []}
    follower.subscribe({"key": "cfg"}, "cfg")
    upstream.set("cfg", 0)
    follower.wait_event("cfg", lambda v: v["value"] == 0)
    for i in range(1, 21):
        assert follower.call("emit_then_sleep", "cfg", i, 0.0002) == 0.0002
        follower.wait_event("cfg", lambda v, i=i: v["value"] == i)


def test_the_leader_polls_for_requests_up_to_leader_spin_wait_and_backs_off(port, upstream, spawn) -> None:
    # leader_spin_wait: the leader's loop polls before a select that would sleep.
    # A poll that ends with nothing read turns polling off for a while, so a loop
    # woken every 2 ms by a timer of its own polls now and then, not every time.
    leader, follower = _pair(spawn, port, upstream.port, asyncio_loop=True, leader_spin_wait=0.001)
    assert follower.request("spin_state", "0") is None  # a follower's callers do not poll
    ticked = leader.request("tick_loop", 0.002, 1.0)
    # polling at every tick would take half of it (1 ms of every 2)
    assert ticked["cpu_s"] < 0.2, f"the loop thread burned {ticked['cpu_s']:.2f} s of CPU in 1 s of timers"
    assert ticked["spin"]["wait"] == 0.001
    assert ticked["spin"]["backoff"] >= 32, ticked  # 500 ticks: 256 or so
    # quick calls (coroutine methods, run on the loop) come while it polls once the
    # skipped selects are used up: polling is back on (a miss or two after the last
    # call may double the backoff again, from 1). On a loaded host a descheduled
    # follower misses polls too, each doubling the skip, so the calls go on until
    # one lands; without the reset the backoff never comes down.
    assert follower.request("acalls_straddling", "0", 1000, 0.0) == {"ok": 1000, "bad": []}

    def polling_again() -> bool:
        if leader.request("leader_spin_state")["backoff"] < 32:
            return True
        assert follower.request("acalls_straddling", "0", 500, 0.0) == {"ok": 500, "bad": []}
        return False

    wait_until(polling_again, timeout=30, what="quick calls to turn polling back on")


@pytest.mark.parametrize("waiter", ["worker", "own_caller"])
def test_the_leader_does_not_poll_while_a_thread_waits_on_its_loop(port, upstream, spawn, waiter: str) -> None:
    # A polling loop thread takes the GIL back after each zero-timeout select,
    # before a waiting thread can. So the loop does not poll while a thread waits
    # on it: a worker running a follower's blocking method, or the leader's own
    # caller of a coroutine method that the loop runs for it.
    leader, follower = _pair(spawn, port, upstream.port, asyncio_loop=True, leader_spin_wait=0.001)
    if waiter == "worker":
        caller = follower
        follower.request("call_in_thread", "0", "sleep", [1.0], "slow")
        wait_until(lambda: leader.request("inflight", "0") == 1, timeout=10, what="the blocking call running on the leader")
    else:
        caller = leader
        leader.request("call_in_thread", "0", "invoke", ["asleep", 1.0], "slow")  # a blocking call
        wait_until(lambda: leader.request("threads_waiting_on_loop") == 1, timeout=10, what="the call waiting on the leader's loop")
    # after a pass of the loop: a poll begun before the thread waited has ended
    before = leader.request("tick_loop", 0.002, 0.0)["spin"]
    ticked = leader.request("tick_loop", 0.002, 0.3)
    assert caller.request("call_running", "slow")
    assert ticked["spin"] == before, "the loop polled while a thread waited on it"
    assert caller.request("join_call", "slow") == ("ok", 1.0)


def test_connshare_asyncio_loop_reads_its_connections_in_place(port, upstream, spawn) -> None:
    # The leader reads each follower's connection inside its selector's select(),
    # and a follower its own; a connection that ends leaves no reader behind.
    leader, follower = _pair(spawn, port, upstream.port, asyncio_loop=True)
    assert leader.request("in_place_readers") == 1
    assert follower.request("in_place_readers") == 1
    follower.subscribe({"key": "cfg"}, "cfg")  # events come through the home loop's read
    for i in range(3):
        upstream.set("cfg", i)
        follower.wait_event("cfg", lambda v, i=i: v["value"] == i)
    assert follower.call("echo", 1) == 1
    follower.request("close", "0")
    wait_until(lambda: leader.request("in_place_readers") == 0, timeout=10, what="the leader forgetting the reader")
    assert follower.request("in_place_readers") == 0


def test_leader_spin_wait_follows_the_leader(port, upstream, spawn) -> None:
    # Only a process that leads polls; when it stops leading it stops polling,
    # and the follower that takes over starts.
    leader, follower = _pair(spawn, port, upstream.port, asyncio_loop=True, leader_spin_wait=0.0002)
    assert leader.request("leader_spin_state")["wait"] == 0.0002
    assert follower.request("leader_spin_state") is None
    leader.request("close", "0")
    assert leader.request("leader_spin_state") is None
    wait_until(lambda: follower.role()["is_leader"], timeout=30, what="the follower taking over")
    wait_until(lambda: follower.request("leader_spin_state") is not None, timeout=10, what="the new leader polling")
    assert follower.call("echo", 1) == 1
