"""``AsyncResource``: the one copy of ``async with`` for the library's long-lived objects.

The client, the repository, the manager and the fake LemonSlice server are all used as
``async with X(...) as x:``; each says only what entering and leaving do (by default: nothing, and
``close()``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncResource:
    """``async with``: ``_enter()`` on the way in, ``_exit()`` (``close()``) on the way out."""

    async def _enter(self) -> None:
        """What entering acquires (nothing by default: the constructor did it)."""

    async def _exit(self) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._exit()
