"""A streaming call of the trio client: its items, then its result."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class AsyncStream(Generic[T, R]):
    """One streaming call: `async for` its items; `.result` once they ended.

    `async with` it to cancel the call when the block is left early; abandoned without,
    trio closes it when it is garbage collected, which cancels it too.
    """

    def __init__(
        self,
        frames: AsyncGenerator[tuple[bool, Any], None],
        item: Callable[[Any], T],
        result: Callable[[Any], R],
    ) -> None:
        self._frames = frames
        self._item = item
        self._result_of = result
        self._result: R | None = None
        self._ended = False

    @property
    def result(self) -> R:
        """The call's result, once every item was taken.

        Raises:
            RuntimeError: the stream has not ended.
        """
        if not self._ended:
            raise RuntimeError("the stream has not ended: take its items first")
        return self._result  # type: ignore[return-value]

    def __aiter__(self) -> AsyncStream[T, R]:
        return self

    async def __anext__(self) -> T:
        if self._ended:
            raise StopAsyncIteration
        is_result, value = await self._frames.__anext__()  # StopAsyncIteration once closed
        if is_result:
            self._result = self._result_of(value)
            self._ended = True
            await self._frames.aclose()
            raise StopAsyncIteration
        return self._item(value)

    async def aclose(self) -> None:
        """Stop taking items; the server is told to cancel the call if unanswered."""
        await self._frames.aclose()

    async def __aenter__(self) -> AsyncStream[T, R]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
