"""The catalog: every message type, its payload model and where it is published.

This is the one place a type name is spelled. Consumers validate payloads against it,
`medhive schema export` turns it into JSON Schema and AsyncAPI for other systems.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from shared.messages.base import Payload
from shared.messages.jobs import JobCancel, JobEvent, JobState, JobSubmit, NodeCancel, NodeRun
from shared.messages.nodes import NodeStatus, RunFinished, RunOutput, RunStarted
from shared.messages.system import MessageRejected

COMMANDS: Final = "medhive.commands"
EVENTS: Final = "medhive.events"
DEAD: Final = "medhive.dead"


@dataclass(frozen=True)
class MessageType:
    """One catalog entry."""

    name: str
    model: type[Payload]
    exchange: Literal["medhive.commands", "medhive.events"]
    summary: str
    routing_key: str = ""  # defaults to the name; `{node_id}` is filled in by the sender

    @property
    def key_pattern(self) -> str:
        return self.routing_key or self.name


_ENTRIES = [
    MessageType("job.submit", JobSubmit, COMMANDS, "Run a job for the sender's tenant."),
    MessageType("job.cancel", JobCancel, COMMANDS, "Cancel a job of the sender's tenant."),
    MessageType("node.run", NodeRun, COMMANDS, "Start one attempt of a job.", "node.{node_id}.run"),
    MessageType("node.cancel", NodeCancel, COMMANDS, "Stop one attempt.", "node.{node_id}.cancel"),
    *(
        MessageType(f"job.{state.value}", JobEvent, EVENTS, f"The job is now {state.value}.")
        for state in JobState
    ),
    MessageType("node.online", NodeStatus, EVENTS, "A node agent started."),
    MessageType("node.heartbeat", NodeStatus, EVENTS, "A node agent is alive; its capacity."),
    MessageType("node.offline", NodeStatus, EVENTS, "A node agent stopped or was lost."),
    MessageType("run.started", RunStarted, EVENTS, "A workload started on a node."),
    MessageType("run.output", RunOutput, EVENTS, "Output a workload printed."),
    MessageType("run.finished", RunFinished, EVENTS, "A workload ended on a node."),
    MessageType(
        "message.rejected", MessageRejected, EVENTS, "A message was dead-lettered, with why."
    ),
]

CATALOG: dict[str, MessageType] = {entry.name: entry for entry in _ENTRIES}


def job_event_type(state: JobState) -> str:
    """The event type announcing that a job entered `state`."""
    return f"job.{state.value}"
