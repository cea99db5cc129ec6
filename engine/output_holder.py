"""The newest output per key, for a reader that may fall behind the engine.

Outputs are cumulative snapshots, so a newer one carries everything an older one did: keeping only the
newest per key bounds what a stream holds to one snapshot per key whatever its reader does, and drops
nothing. An exception is final for its key. One holder per request (AsyncLLM) or per HTTP request with
several prompts (the server); when the engine moves to its own process, the same holder merges the
deltas it sends.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class OutputHolder(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[int, T | BaseException] = {}  # key -> newest item not taken yet
        self._ready = asyncio.Event()  # set while _items is not empty

    def put(self, key: int, item: T | BaseException) -> None:
        """Replace the key's untaken item (an untaken exception stays: it ends the key)."""
        if isinstance(self._items.get(key), BaseException):
            return
        self._items[key] = item
        self._ready.set()

    async def take(self) -> dict[int, T | BaseException]:
        """Wait for at least one item, then take every untaken one (in the order their keys arrived)."""
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, {}
        return items

    def __len__(self) -> int:
        return len(self._items)
