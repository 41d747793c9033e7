"""Which exits quiltd's TTL caused: the ones systemd's RuntimeMaxSec ended, and no other.

The system test waits for a real TTL; the edges (a client's stop just past
the TTL, an exit just before it, an adopted container) are checked here.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from quiltd.core.manager import START_SLACK_USEC, ttl_expired
from quiltd.model import Container, ContainerSpec, State

SEC = 1_000_000
SINCE = 5_000 * SEC  # CLOCK_BOOTTIME when the scope was asked for


def running(ttl_sec: int) -> Container:
    return Container(id="0" * 16, name="c", image="busybox", image_id="x", command=("sleep", "9"),
                     spec=ContainerSpec(ttl_sec=ttl_sec), state=State.RUNNING,
                     started_boot_usec=SINCE + SEC // 10)


def test_an_exit_once_the_ttl_has_passed_is_the_ttl() -> None:
    assert ttl_expired(running(2), SINCE, SINCE + 2 * SEC, stopped_by_client=False)
    assert ttl_expired(running(2), SINCE, SINCE + 95 * SEC, stopped_by_client=False)  # after SIGKILL


@pytest.mark.parametrize(("ttl", "since", "now", "by_client", "state"), [
    (2, SINCE, SINCE + 2 * SEC - 1, False, State.RUNNING),   # ended on its own just before
    (0, SINCE, SINCE + 99 * SEC, False, State.RUNNING),      # no TTL
    (2, SINCE, SINCE + 3 * SEC, True, State.RUNNING),        # a client's Kill with SIGKILL
    (2, SINCE, SINCE + 3 * SEC, False, State.STOPPING),      # a client's Stop
    (2, SINCE, None, False, State.RUNNING),                  # found gone while quiltd was down
])
def test_other_exits_are_not(ttl: int, since: int, now: int | None, by_client: bool, state: State) -> None:
    assert not ttl_expired(replace(running(ttl), state=state), since, now, by_client)


def test_an_adopted_container_counts_from_its_start_less_the_slack() -> None:
    c = running(10)
    assert ttl_expired(c, None, c.started_boot_usec - START_SLACK_USEC + 10 * SEC, stopped_by_client=False)
    assert not ttl_expired(c, None, c.started_boot_usec - START_SLACK_USEC + 10 * SEC - 1,
                           stopped_by_client=False)
