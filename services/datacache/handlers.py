"""What the datacache consumes: the scheduler's commands about a job's data.

The table at the end is the only place the datacache names the message types it takes
(`shared.handlers`).
"""

from __future__ import annotations

from services.datacache.grants import GrantService
from services.datacache.outputs import ResultUploader
from services.datacache.staging import Stager
from shared import topology
from shared.consume import Incoming
from shared.handlers import HandlerTable, on
from shared.messages.data import DataGrant, DataRelease, DataStage


class CommandHandlers:
    """Staging, granting and releasing a job's data."""

    def __init__(self, stager: Stager, grants: GrantService, uploader: ResultUploader) -> None:
        self.stager = stager
        self.grants = grants
        self.uploader = uploader

    async def stage(self, msg: Incoming[DataStage]) -> None:
        await self.stager.stage(msg.envelope, msg.payload)

    async def grant(self, msg: Incoming[DataGrant]) -> None:
        await self.grants.grant(msg.envelope, msg.payload)

    async def release(self, msg: Incoming[DataRelease]) -> None:
        """Revoke the job's grants, then send its results where the job asked."""
        await self.grants.release(msg.envelope, msg.payload)
        await self.uploader.job_ended(msg.envelope, msg.payload)


COMMANDS = HandlerTable(
    topology.DATACACHE_COMMANDS,
    (
        on("data.stage", DataStage, CommandHandlers.stage),
        on("data.grant", DataGrant, CommandHandlers.grant),
        on("data.release", DataRelease, CommandHandlers.release),
    ),
)
