"""Run an iterator on a background thread, one item ahead of its consumer (torch ops release the
GIL, so on two cores making the next item overlaps with using this one)."""

from __future__ import annotations

import queue
import threading
from typing import Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Prefetch(Generic[T]):
    """Iterate `items` in a worker thread. Besides the item in the consumer's hand, at most two are
    alive: one waiting and one being made. Errors reach the consumer at the item that raised them.
    Use as a context manager, so an early exit stops the worker."""

    def __init__(self, items: Iterable[T]):
        self._queue: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._run, args=(iter(items),), name="prefetch", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except BaseException as exc:  # handed to the consumer
            self._put((False, exc))

    def _put(self, entry: tuple[bool, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetch[T]":
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        ok, value = self._queue.get()
        if ok:
            return value  # type: ignore[return-value]
        self._finished = True
        if value is None:
            raise StopIteration
        raise value  # type: ignore[misc]

    def close(self) -> None:
        """Stop the worker (it finishes the item in hand) and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
