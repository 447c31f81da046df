"""Prefetch: results in order, per-slot buffers never shared by two live results, errors at the item
that raised, early exit stops the workers."""

from __future__ import annotations

import threading
import time

import pytest

from npo_merge.prefetch import Prefetch


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_arrive_in_order_and_live_ones_never_share_a_slot(workers: int) -> None:
    held: dict[int, int] = {}  # slot -> item, for every result made and not yet given back
    lock = threading.Lock()

    def make(slot: int, item: int) -> tuple[int, int]:
        time.sleep(0.001 * (item % 3))  # finish out of order
        with lock:
            assert slot not in held, f"slot {slot} of item {held.get(slot)} reused for item {item}"
            held[slot] = item
        return slot, item

    got = []
    with Prefetch(make, range(40), workers) as results:
        assert results.slots == workers + 2
        for slot, item in results:
            got.append(item)
            time.sleep(0.002)  # the consumer holds the result a while
            with lock:
                del held[slot]  # given back at the next call
    assert got == list(range(40))


def test_an_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def make(slot: int, item: int) -> int:
        if item == 3:
            raise ValueError("delta 3 has NaN")
        return item

    got = []
    with pytest.raises(ValueError, match="delta 3 has NaN"), Prefetch(make, range(1, 10), 2) as items:
        for item in items:
            got.append(item)
    assert got == [1, 2]


def test_early_exit_stops_the_workers_ahead_of_at_most_workers_plus_one_items() -> None:
    made = []

    def endless():
        n = 0
        while True:
            yield n
            n += 1

    with Prefetch(lambda slot, item: made.append(item) or item, endless(), 2) as items:
        assert next(items) == 0
    assert not any(t.name.startswith("prefetch") and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 4
