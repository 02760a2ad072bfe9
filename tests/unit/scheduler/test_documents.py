"""The stored shapes say what the models they are dumped from hold: a field added to a
model and not to its document would go unchecked by mypy."""

from __future__ import annotations

from services.scheduler.documents import JobSpecDocument, NodeDocument, ResourcesDocument
from shared.messages.jobs import JobSpec, Resources
from shared.messages.nodes import NodeStatus


def test_job_spec_documents_have_the_models_fields() -> None:
    assert set(JobSpecDocument.__annotations__) == set(JobSpec.model_fields)
    assert set(ResourcesDocument.__annotations__) == set(Resources.model_fields)


def test_node_documents_have_the_status_and_what_the_store_adds() -> None:
    added = {"_id", "online", "last_seen"}
    assert set(NodeDocument.__annotations__) == set(NodeStatus.model_fields) | added
