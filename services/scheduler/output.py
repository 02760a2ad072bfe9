"""What each attempt of a job printed: the last bytes of its stdout and stderr, as its
node reported them (`run.output`)."""

from __future__ import annotations

from typing import cast

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.documents import OutputDocument
from shared.mongo import Document


class OutputStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.output = db["output"]

    async def create_indexes(self) -> None:
        await self.output.create_index(
            [("job_id", ASCENDING), ("attempt", ASCENDING), ("stream", ASCENDING)], unique=True
        )

    async def save_output(
        self, job_id: str, attempt: int, stream: str, data: str, truncated: bool, limit: int
    ) -> None:
        if len(data) > limit:
            data, truncated = data[-limit:], True
        await self.output.update_one(
            {"job_id": job_id, "attempt": attempt, "stream": stream},
            {"$set": {"data": data, "truncated": truncated}},
            upsert=True,
        )

    async def get_output(self, job_id: str, attempt: int) -> dict[str, OutputDocument]:
        docs = await self.output.find({"job_id": job_id, "attempt": attempt}).to_list()
        return {doc["stream"]: doc for doc in cast(list[OutputDocument], docs)}
