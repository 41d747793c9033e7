"""Choosing a container's user namespace range."""

from __future__ import annotations

from quiltd.runtime import userns


def test_the_lowest_free_range_is_chosen() -> None:
    first, size = userns.FIRST_BASE, userns.RANGE_SIZE
    assert userns.free_base([]) == first
    assert userns.free_base([first, first + size]) == first + 2 * size
    # A range freed by a removal is handed out again before any higher one.
    assert userns.free_base([first, first + 2 * size]) == first + size


def test_ranges_stay_inside_the_container_block_and_run_out() -> None:
    every = range(userns.FIRST_BASE, userns.LAST_BASE + 1, userns.RANGE_SIZE)
    assert every[-1] + userns.RANGE_SIZE - 1 == 0x6FFFFFFF
    assert userns.free_base(every[:-1]) == every[-1]
    assert userns.free_base(every) is None
