"""Hostile calls to every method, from a fixed seed: each is answered in time with an error that names
the fault, and quiltd ends holding what it held before. tools/fuzz runs the same calls for longer."""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import fuzz

pytestmark = pytest.mark.system

SEED = 20261130
CALLS_PER_TRANSPORT = 700
WARMUP_CALLS = 300
CALL_TIMEOUT = 10.0  # the slowest honest answer (an import of the busybox image, a whole copy) takes ~1 s
FD_SLACK = 3  # descriptors quiltd opens once and keeps
# quiltd's RSS after the run may exceed the baseline by this much. The baseline
# is taken after the largest messages (see fuzz.prime): RSS is a high-water
# mark, and without that a first 4 MiB string alone grew it by 20 MiB. After
# it, 6,000 calls grew it by under 3 MiB, while before the descriptor fixes
# 11,000 calls grew it by 50 MiB, some 6 MiB per 1,400 calls: a leak of that
# rate fails this bound.
RSS_GROWTH_KIB = 5 << 10
WATCHDOG_DROPIN = "/run/systemd/system/quiltd.service.d/zz-test-watchdog.conf"


@pytest.fixture
def served(sandbox: Any, busybox_image: str) -> Iterator[dict[fuzz.Transport, str]]:
    """quiltd on the bus and its socket, with a short watchdog so a stalled event loop shows at once."""
    sandbox.run(["sh", "-c", 'mkdir -p "${1%/*}" && printf "[Service]\\nWatchdogSec=3\\n" > "$1"', "sh",
                 WATCHDOG_DROPIN])
    sandbox.run(["systemctl", "daemon-reload"])
    fuzz.serve_socket(sandbox)
    try:
        yield fuzz.addresses(sandbox)
    finally:
        fuzz.stop_serving_socket(sandbox)
        sandbox.run(["rm", "-f", WATCHDOG_DROPIN], check=False)
        sandbox.run(["systemctl", "daemon-reload"], check=False)


def fuzz_both(address: dict[fuzz.Transport, str], calls: int, seed: int, scratch: Path) -> list[fuzz.Summary]:
    return [asyncio.run(fuzz.fuzz(address[t], t, calls, seed + i, scratch, CALL_TIMEOUT))
            for i, t in enumerate(fuzz.Transport)]


def test_hostile_calls_get_named_errors_in_time_and_leave_nothing_held(
        sandbox: Any, served: dict[fuzz.Transport, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="quilt-fuzz-") as scratch:
        # What quiltd opens lazily is opened, and its memory has seen the largest messages.
        fuzz_both(served, WARMUP_CALLS, SEED + 1000, Path(scratch))
        for address in served.values():
            asyncio.run(fuzz.prime(address))
        before = fuzz.quiltd_process(sandbox)
        summaries = fuzz_both(served, CALLS_PER_TRANSPORT, SEED, Path(scratch))
        after = fuzz.settled(sandbox, before, FD_SLACK)
    report = "\n\n".join(s.render() for s in summaries)
    for s in summaries:
        assert s.total == CALLS_PER_TRANSPORT
        assert not s.hangs, report
        assert not s.bad, report
        assert not s.disconnects, report
        # The calls reached past the lookups: some succeeded, and the checks answered most.
        assert s.answers["ok"] > 0 and s.answers[fuzz.QUILT_ERROR + "InvalidArgument"] > 0, report
    assert (after.pid, after.restarts) == (before.pid, before.restarts)
    grown = Counter(after.fd_targets) - Counter(before.fd_targets)
    assert after.fds <= before.fds + FD_SLACK, (before.fds, after.fds, grown)
    assert after.rss_kib - before.rss_kib < RSS_GROWTH_KIB, (before.rss_kib, after.rss_kib)
