"""MongoDB through PyMongo's native asyncio API (the successor of motor)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from shared.settings import MongoSettings

Document = dict[str, Any]


def connect(settings: MongoSettings) -> AsyncMongoClient[Document]:
    """A client with UTC-aware datetimes; it connects lazily on first use."""
    return AsyncMongoClient(
        settings.url.get_secret_value(), tz_aware=True, serverSelectionTimeoutMS=10_000
    )
