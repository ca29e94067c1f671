"""Edge cases found by the hostile-input work, each through the public API."""

from __future__ import annotations

import time

import pytest

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


def test_a_frame_the_leader_keeps_refusing_is_not_resent_forever(port, spawn) -> None:
    with in_process_leader(port, secret=SECRET, max_frame_size=64 * 1024):
        # a follower configured with a larger frame limit than its leader's
        (follower,) = spawn([blast_spec(port, secret=SECRET, max_frame_size=4 * 1024 * 1024, response_timeout=20)])
        follower.ready()
        t0 = time.monotonic()
        with pytest.raises(AgentError) as info:
            follower.call("echo", b"x" * 300_000)
        assert info.value.isa("LeaderLostError"), info.value.desc
        assert time.monotonic() - t0 < 10  # a few resends, not until response_timeout
        assert follower.call("echo", "small") == "small"
