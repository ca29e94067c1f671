"""Edge cases found by the hostile-input work, each through the public API."""

from __future__ import annotations

import pytest

from tests.conftest import kv_spec
from tests.harness import AgentError, wait_until
from tests.hostile_clients import blast_spec, in_process_leader

SECRET = "edge-cases-secret-0123456789"


def test_an_event_too_large_for_a_frame_is_an_error_everywhere_not_silence(port, spawn) -> None:
    with in_process_leader(port, secret=SECRET, max_frame_size=64 * 1024) as leader:
        errors: list = []
        leader.on("error", errors.append)
        (follower,) = spawn([blast_spec(port, secret=SECRET, max_frame_size=64 * 1024)])
        follower.ready()
        follower.subscribe({"key": "k"}, "k")
        wait_until(lambda: "k" in leader.invoke("history")["subscribed"], what="the subscription to reach the leader")
        leader.invoke("send", "k", {"fits": True})
        follower.wait_event("k", lambda v: v == {"fits": True})
        leader.invoke("send", "k", {"data": b"x" * 100_000})
        errs = wait_until(lambda: follower.request("errors", "0"), what="an error event in the follower")
        assert errs[0]["type"] == "FrameTooLargeError"
        wait_until(lambda: errors, what="an error event in the leader")
        leader.invoke("send", "k", {"fits": "again"})
        follower.wait_event("k", lambda v: v == {"fits": "again"})


def test_a_refused_subscription_can_be_asked_again(port, spawn) -> None:
    with in_process_leader(port, secret=SECRET, max_subscriptions_per_follower=1) as leader:
        (follower,) = spawn([blast_spec(port, secret=SECRET)])
        follower.ready()
        follower.subscribe({"key": "a"}, "a")
        follower.subscribe({"key": "b"}, "b")  # over the limit: refused
        errs = wait_until(lambda: follower.request("errors", "0"), what="the refusal")
        assert errs[0]["type"] == "LimitExceededError"
        follower.request("unsubscribe", "0", {"key": "a"})
        follower.subscribe({"key": "b"}, "b")  # a slot is free: this one is sent
        wait_until(lambda: "b" in leader.invoke("history")["subscribed"], what="the second subscribe to reach the leader")
        leader.invoke("send", "b", 7)
        follower.wait_event("b", lambda v: v == 7)


# -- processes set to different max_frame_size ---------------------------------------


def _frame_pair(port, upstream, spawn, leader_limit: int | None, follower_limit: int | None):
    def spec(limit: int | None) -> dict:
        return kv_spec(port, upstream.port, **({} if limit is None else {"max_frame_size": limit}))

    (leader,) = spawn([spec(leader_limit)])
    leader.ready()
    (follower,) = spawn([spec(follower_limit)])
    follower.ready()
    return leader, follower


def _agent_error(w, *args) -> AgentError:
    with pytest.raises(AgentError) as info:
        w.call(*args)
    return info.value


def test_a_value_over_a_followers_smaller_max_frame_size_is_reported_not_sent(port, upstream, spawn) -> None:
    _, follower = _frame_pair(port, upstream, spawn, None, 4096)
    conn = follower.request("conn_id", "0")
    follower.subscribe({"key": "big"}, "b")
    follower.wait_event("b")  # its first value (None)
    upstream.set("big", "x" * 10_000)
    errs = wait_until(lambda: follower.request("errors", "0"), what="the value's error")
    assert errs[0]["type"] == "FrameTooLargeError" and "max_frame_size=4096" in errs[0]["message"], errs
    # the connection stays, and the next value that fits arrives
    upstream.set("big", "small")
    follower.wait_event("b", lambda v: v["value"] == "small")
    # a result too large for the follower fails that call, and only it
    upstream.set("k", "y" * 10_000)
    err = _agent_error(follower, "get", "k")
    assert err.type == "FrameTooLargeError" and "result" in err.desc["message"], err.desc
    assert follower.call("echo", "fits") == "fits"
    assert follower.request("conn_id", "0") == conn
    assert len(follower.request("errors", "0")) == 1


def test_a_request_over_the_leaders_smaller_max_frame_size_fails_in_the_caller(port, upstream, spawn) -> None:
    _, follower = _frame_pair(port, upstream, spawn, 4096, None)
    conn = follower.request("conn_id", "0")
    err = _agent_error(follower, "echo", "x" * 10_000)
    assert err.type == "FrameTooLargeError" and "the leader's max_frame_size=4096" in err.desc["message"], err.desc
    follower.request("publish", "0", {"blob": "x" * 10_000})
    errs = wait_until(lambda: follower.request("errors", "0"), what="the publication's error")
    assert errs[0]["type"] == "FrameTooLargeError", errs
    assert follower.call("echo", "fits") == "fits"
    assert follower.request("conn_id", "0") == conn
    assert upstream.published() == []
