"""What the node agent exports at `/metrics`: the capacity it offers, what the runs it
watches reserve of it, and how many there are; read from the agent when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.vmnode.agent import Agent
from shared.metrics import StateCollector

MIB = 1024 * 1024


class NodeCollector(StateCollector):
    """The node's capacity against the runs it watches."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        settings = self.agent.settings
        watches = self.agent.watches()
        needs = [w.need for w in watches if w.need is not None]
        values = [
            ("medhive_vmnode_runs", "Attempts the agent watches (started, not yet reported).",
             len(watches)),
            ("medhive_vmnode_capacity_cpus", "CPU cores the node offers to jobs.", settings.cpus),
            ("medhive_vmnode_reserved_cpus", "CPU cores the watched runs asked for.",
             sum(n.cpus for n in needs)),
            ("medhive_vmnode_capacity_memory_bytes", "Memory the node offers to jobs.",
             settings.memory_mb * MIB),
            ("medhive_vmnode_reserved_memory_bytes", "Memory the watched runs asked for.",
             sum(n.memory_mb for n in needs) * MIB),
        ]  # fmt: skip
        for name, help_, value in values:
            gauge = GaugeMetricFamily(name, help_, labels=["node"])
            gauge.add_metric([settings.node_id], value)
            yield gauge
