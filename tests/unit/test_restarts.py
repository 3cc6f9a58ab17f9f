"""`serve` restarts a child that ran a while at once, one that keeps failing to start later."""

from __future__ import annotations

from dicomai.restarts import RestartBackoff


def test_a_child_failing_to_start_waits_longer_each_time_up_to_a_limit() -> None:
    backoff = RestartBackoff(quick=30, first=1, most=8)
    waits = []
    now = 0.0
    for _ in range(6):
        backoff.started("worker", now)
        now += 5  # exits five seconds after each start
        waits.append(backoff.exited("worker", now))
        now += waits[-1]
    assert waits == [1, 2, 4, 8, 8, 8]


def test_a_child_that_ran_a_while_restarts_at_once_and_its_count_starts_over() -> None:
    backoff = RestartBackoff(quick=30, first=1, most=8)
    backoff.started("worker", 0)
    assert backoff.exited("worker", 5) == 1
    backoff.started("worker", 6)
    assert backoff.exited("worker", 100) == 0  # killed after a long run: a crash, not a loop
    backoff.started("worker", 100)
    assert backoff.exited("worker", 101) == 1
    backoff.started("listener-1", 0)
    assert backoff.exited("listener-1", 1) == 1  # each child counts its own
