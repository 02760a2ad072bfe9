"""The nodes as the scheduler knows them: each one's last `NodeStatus`, and whether it
is online.

The scheduler is the nodes' only writer, so it reads them from the store once and keeps
them in memory: placement and the watchdog read them at every pass (a pass per job
ending) without a query.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from pymongo.asynchronous.database import AsyncDatabase

from services.scheduler.documents import NodeDocument
from shared.envelope import utcnow
from shared.mongo import Document


class NodeStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.nodes = db["nodes"]
        #: The nodes as this scheduler last wrote them, read from the store once.
        self._nodes: dict[str, NodeDocument] | None = None

    async def node_seen(self, node_id: str, status: Document, online: bool) -> None:
        """Store what a node reported (`status` is its `NodeStatus`, dumped)."""
        fields = {**status, "online": online, "last_seen": utcnow()}
        view = await self._view()
        # `status` is untyped: with it, the node is a NodeDocument (`NodeStatus`'s fields).
        node = cast(NodeDocument, {**view.get(node_id, {"_id": node_id}), **fields})
        view[node_id] = node  # in arrival order
        await self.nodes.update_one({"_id": node_id}, {"$set": fields}, upsert=True)

    async def online_nodes(self) -> list[NodeDocument]:
        return [node.copy() for node in (await self._view()).values() if node["online"]]

    async def all_nodes(self) -> list[NodeDocument]:
        view = await self._view()
        return [view[node_id].copy() for node_id in sorted(view)]

    async def mark_offline(self, node_id: str, seen_before: datetime) -> bool:
        """Mark a node offline if it has not been seen since `seen_before`."""
        result = await self.nodes.update_one(
            {"_id": node_id, "online": True, "last_seen": {"$lt": seen_before}},
            {"$set": {"online": False}},
        )
        if result.modified_count != 1:
            return False
        view = await self._view()
        if node_id in view and view[node_id]["last_seen"] < seen_before:
            view[node_id] = {**view[node_id], "online": False}
        return True

    async def _view(self) -> dict[str, NodeDocument]:
        if self._nodes is None:
            # What pymongo reads is untyped; the scheduler writes every node it stores.
            stored = cast(list[NodeDocument], await self.nodes.find().to_list())
            nodes = {node["_id"]: node for node in stored}
            if self._nodes is None:  # no concurrent first read got there first
                self._nodes = nodes
        return self._nodes
