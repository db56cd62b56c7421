"""sidecar.upstream.Breaker, directly: the circuit breaker's states over an explicit clock."""

from __future__ import annotations

from sidecar.upstream import Breaker


def failing(breaker: Breaker, times: int, now: float) -> None:
    for _ in range(times):
        assert breaker.allow(now)
        breaker.failure(now)


def test_closed_until_the_threshold_of_consecutive_failures() -> None:
    breaker = Breaker(failure_threshold=3, cooldown=2.0)
    failing(breaker, 2, now=100.0)
    assert breaker.allow(100.0)
    assert breaker.state(100.0) == "degraded"
    breaker.failure(100.0)
    assert breaker.state(100.0) == "down"
    assert not breaker.allow(100.0)
    assert not breaker.allow(101.999)


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = Breaker(failure_threshold=3)
    failing(breaker, 2, now=100.0)
    breaker.success()
    failing(breaker, 2, now=100.0)
    assert breaker.allow(100.0)  # 2 + 2 failures, but never 3 in a row


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    breaker = Breaker(failure_threshold=2, cooldown=2.0)
    failing(breaker, 2, now=100.0)
    assert not breaker.allow(101.0)
    assert breaker.allow(102.0)  # the probe
    assert not breaker.allow(102.0)  # everyone else waits for its outcome
    assert not breaker.allow(500.0)


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker = Breaker(failure_threshold=2, cooldown=2.0)
    failing(breaker, 2, now=100.0)
    assert breaker.allow(102.0)
    breaker.success()
    assert breaker.allow(102.0) and breaker.allow(102.0)
    assert breaker.state(102.0) == "degraded"  # a failure within the degraded window
    assert breaker.state(102.0 + breaker.degraded_window) == "ok"


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() -> None:
    breaker = Breaker(failure_threshold=1, cooldown=2.0, max_cooldown=5.0)
    breaker.failure(0.0)
    opened = 0.0
    for cooldown in (2.0, 4.0, 5.0, 5.0):  # 2, then doubled per failed probe, capped at 5
        assert not breaker.allow(opened + cooldown - 0.001)
        assert breaker.allow(opened + cooldown)  # the probe
        opened += cooldown
        breaker.failure(opened)
    assert breaker.allow(opened + 5.0)
    breaker.success()
    # A success starts the next cool-down from the base again.
    breaker.failure(100.0)
    assert not breaker.allow(101.999)
    assert breaker.allow(102.0)


def test_state_turns_ok_only_after_the_degraded_window() -> None:
    breaker = Breaker(failure_threshold=5, degraded_window=30.0)
    assert breaker.state(0.0) == "ok"
    breaker.failure(10.0)
    breaker.success()
    assert breaker.state(39.9) == "degraded"
    assert breaker.state(40.0) == "ok"
