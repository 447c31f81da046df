"""Prefetch: same items in the same order, errors at the item that raised, early exit stops the worker."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest

from npo_merge.prefetch import Prefetch


def test_items_arrive_in_order_and_end() -> None:
    with Prefetch(range(100)) as items:
        assert list(items) == list(range(100))
        assert list(items) == []


def test_an_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("delta 3 has NaN")

    got = []
    with pytest.raises(ValueError, match="delta 3 has NaN"), Prefetch(failing()) as items:
        for item in items:
            got.append(item)
    assert got == [1, 2]


def test_early_exit_stops_the_worker_ahead_of_at_most_two_items() -> None:
    made = []

    def endless() -> Iterator[int]:
        n = 0
        while True:
            made.append(n)
            yield n
            n += 1

    prefetch = Prefetch(endless())
    with prefetch as items:
        assert next(items) == 0
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 3
