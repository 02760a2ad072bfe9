"""Workload runtimes of the node agent: one `Runtime` protocol, one module per engine."""

from __future__ import annotations

from services.vmnode.runtimes.base import (
    EngineUnavailable,
    ExitInfo,
    ImageMissing,
    Output,
    Runtime,
    Workload,
    WorkloadGone,
    WorkloadRefused,
)
from services.vmnode.settings import NodeSettings


def create_runtime(settings: NodeSettings) -> Runtime:
    """The runtime the settings name; it opens no connection until first used."""
    if settings.runtime == "instant":
        from services.vmnode.runtimes.instant import InstantRuntime

        return InstantRuntime(settings)
    from services.vmnode.runtimes.docker import DockerRuntime

    return DockerRuntime(settings)


__all__ = [
    "EngineUnavailable",
    "ExitInfo",
    "ImageMissing",
    "Output",
    "Runtime",
    "Workload",
    "WorkloadGone",
    "WorkloadRefused",
    "create_runtime",
]
