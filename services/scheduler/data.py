"""What the datacache reports about a job's data, and what the scheduler makes of it.

`data.staged` makes a staging job eligible for placement; `data.granted` releases the
job to its node; `data.failed` ends the job with the reason. Progress, results and
uploads are recorded on the job for the API, without changing its state.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.scheduler.jobs import JobService
from shared.bus import Handler, Incoming
from shared.messages.data import (
    DataFailed,
    DataGranted,
    DataOutputs,
    DataProgress,
    DataStaged,
    DataUploaded,
)
from shared.messages.jobs import JobState

log = structlog.get_logger("medhive.scheduler.data")

#: The datacache's events the scheduler consumes.
DATA_REPORTS = [
    "data.staged",
    "data.failed",
    "data.progress",
    "data.granted",
    "data.outputs",
    "data.uploaded",
]


class DataHandlers:
    def __init__(self, jobs: JobService, wake: Callable[[], None]) -> None:
        self.jobs = jobs
        self.wake = wake

    def handlers(self) -> dict[str, Handler]:
        return {
            "data.staged": self.staged,
            "data.failed": self.failed,
            "data.progress": self.progress,
            "data.granted": self.granted,
            "data.outputs": self.outputs,
            "data.uploaded": self.uploaded,
        }

    async def staged(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataStaged)
        p = msg.payload
        fields = {
            "inputs_staged": True,
            "staged_inputs": [item.model_dump(mode="json") for item in p.inputs],
            "staging_progress.done": True,
        }
        if await self.jobs.annotate(p.job_id, fields, expect={"state": JobState.staging.value}):
            self.wake()

    async def failed(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataFailed)
        await self.jobs.fail(msg.payload.job_id, msg.payload.reason, str(msg.envelope.id))

    async def progress(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataProgress)
        p = msg.payload
        # Reports of one job are handled in order (the consumer locks per job), so the
        # latest always wins.
        progress = {"input": p.input, "files": p.files, "bytes": p.bytes, "done": False}
        await self.jobs.annotate(
            p.job_id, {"staging_progress": progress}, expect={"state": JobState.staging.value}
        )

    async def granted(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataGranted)
        p = msg.payload
        await self.jobs.granted(p.job_id, p.attempt, p.node_id)

    async def outputs(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataOutputs)
        p = msg.payload
        files = [item.model_dump(mode="json") for item in p.files]
        outputs = {"attempt": p.attempt, "files": files, "bytes": p.bytes}
        await self.jobs.annotate(p.job_id, {"outputs": outputs})

    async def uploaded(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, DataUploaded)
        p = msg.payload
        outcome = "uploaded" if p.ok else "upload failed"
        note = {"event": "data.uploaded", "reason": f"results {outcome}: {p.detail}"}
        upload = {"destination": p.destination, "ok": p.ok, "detail": p.detail}
        await self.jobs.annotate(p.job_id, {"outputs_upload": upload}, note=note)
