"""Progress reporting: library functions take a factory; the CLI passes tqdm bars, tests pass nothing."""

from __future__ import annotations

from typing import Callable, Protocol


class Progress(Protocol):
    """The part of a tqdm bar the library uses."""

    def update(self, n: int = 1) -> object: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], Progress]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, desc: str) -> Progress:
    """A factory that reports nothing (the library default)."""
    return _Silent()


def tqdm_progress(quiet: bool = False, unit: str = "tensor") -> ProgressFactory:
    """tqdm bars on stderr; silent with `quiet`. tqdm itself waits 1 s before drawing a bar."""
    from tqdm.auto import tqdm

    def factory(total: int, desc: str) -> Progress:
        return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, delay=1.0, dynamic_ncols=True)

    return factory
