"""What a node agent consumes: the scheduler's commands for this node.

The table is the only place the agent names the message types it takes
(`shared.handlers`); the handlers are the agent's own (`Agent.on_run`, `on_cancel`),
since starting and stopping a workload is what the agent is.
"""

from __future__ import annotations

from services.vmnode.agent import Agent
from shared import topology
from shared.handlers import HandlerTable, on
from shared.messages.jobs import NodeCancel, NodeRun

COMMANDS = HandlerTable(
    topology.NODE_COMMANDS,
    (
        on("node.run", NodeRun, Agent.on_run),
        on("node.cancel", NodeCancel, Agent.on_cancel),
    ),
)
