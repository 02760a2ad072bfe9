"""What the source tests share: a sink that keeps each delivered file in memory."""

from __future__ import annotations

from collections.abc import AsyncIterable


class Collect:
    """A `FileSink` for tests: path -> the bytes a source delivered."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    async def put(self, path: str, chunks: AsyncIterable[bytes]) -> None:
        self.files[path] = b"".join([chunk async for chunk in chunks])
