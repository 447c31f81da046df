"""Make the next items on worker threads while the consumer uses this one (torch ops release the GIL,
so on two cores the deltas of the next row chunks are made while this chunk is added and written)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class Prefetch(Generic[T, R]):
    """`make(slot, item)` for each of `items` on `workers` threads, results handed out in order.

    At most `workers + 1` results are made or waiting ahead of the one in the consumer's hand, and
    `slot` (in range(slots)) differs between any two of them, so `make` may keep per-slot buffers.
    Errors reach the consumer at the item that raised them. Use as a context manager, so an early exit
    stops the workers (each finishes the item in hand).
    """

    def __init__(self, make: Callable[[int, T], R], items: Iterable[T], workers: int = 1):
        self.slots = workers + 2
        self._make, self._items, self._made = make, iter(items), 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
        self._ahead: deque[Future[R]] = deque()
        for _ in range(workers + 1):
            self._submit()

    def _submit(self) -> None:
        item = next(self._items, _END)
        if item is not _END:
            self._ahead.append(self._pool.submit(self._make, self._made % self.slots, item))
            self._made += 1

    def __iter__(self) -> "Prefetch[T, R]":
        return self

    def __next__(self) -> R:
        if not self._ahead:
            raise StopIteration
        result = self._ahead.popleft().result()
        self._submit()  # its slot is the one of the item the consumer just gave back
        return result

    def close(self) -> None:
        """Stop the workers and wait for them."""
        for future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetch[T, R]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
