"""The datacache's catalog in MongoDB; the encrypted bytes themselves are in `BlobStore`.

- `objects`: one per distinct plaintext (`_id` = its SHA-256), with the blob holding it,
  the tenants that may be granted it, and when it was last used (for LRU and TTL).
- `sources`: what a source URI held at a version, for a tenant: the files and their
  objects. A second job on the same input finds it here and fetches nothing.
- `stagings`: one per job: its inputs, how far staging got, and the objects it pins.
  A restarted datacache resumes every staging that was not finished.
- `grants`: one per job attempt: which node may read which objects, until when.
- `results`: the files a job's node stored from /outputs.
- `uploads`: a job's results on their way to the destination the job named.

The shapes of objects, stagings, grants and results are in `documents.py`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, cast

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from services.datacache.documents import Deadline, GrantDoc, ObjectDoc, ResultDoc, StagingDoc
from shared.envelope import utcnow
from shared.mongo import ADVISORY, Document, insert_new

#: Objects named in one query (`$in`): the SecantusDB server compares every document it
#: finds with every id listed, so a query costs it the square of its list (a study's
#: 1,000 objects in one statement took it about a second; ten of 100 take a tenth).
LOOKUP_CHUNK = 100


def source_key(tenant: str, canonical: str, version: str | None) -> str:
    """The id of what one source held at one version, as one tenant fetched it."""
    return hashlib.sha256(f"{tenant}\0{canonical}\0{version or ''}".encode()).hexdigest()


class CacheStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        # pymongo returns the stored dicts as they are; these collections hold only
        # what this class writes, so their documents are typed as written, here once.
        self.objects = cast("AsyncCollection[ObjectDoc]", db["objects"])
        self.sources = db["sources"]
        self.stagings = cast("AsyncCollection[StagingDoc]", db["stagings"])
        self.grants = cast("AsyncCollection[GrantDoc]", db["grants"])
        self.results = cast("AsyncCollection[ResultDoc]", db["results"])
        self.uploads = db["uploads"]

    async def create_indexes(self) -> None:
        await self.objects.create_index([("last_access", ASCENDING)])
        await self.sources.create_index([("files.sha256", ASCENDING)])
        await self.stagings.create_index([("state", ASCENDING)])
        await self.grants.create_index([("job_id", ASCENDING)])
        await self.grants.create_index([("delegates", ASCENDING)], sparse=True)
        await self.results.create_index([("job_id", ASCENDING), ("path", ASCENDING)], unique=True)

    # -- objects ----------------------------------------------------------------------

    async def add_object(self, sha256: str, blob_id: str, size: int, tenant: str) -> str:
        """Record one stored blob under its content hash, for `tenant`; the blob that now
        holds this content comes back (see `add_objects`)."""
        holders = await self.add_objects([(sha256, blob_id, size)], tenant)
        return holders[sha256]

    async def add_objects(self, blobs: list[tuple[str, str, int]], tenant: str) -> dict[str, str]:
        """Record stored blobs, (SHA-256, blob id, size) each, under their content hashes
        for `tenant`, in a few round trips whatever their number (a study is thousands of
        small files). Returns, per hash, the blob that holds it: the one given, or one
        recorded before (then the caller deletes its duplicate). A quarantined copy is
        replaced by the fresh one."""
        now = utcnow()
        holders = {sha256: blob_id for sha256, blob_id, _ in reversed(blobs)}  # first wins
        docs: list[ObjectDoc] = [
            {"_id": sha256, "blob": blob_id, "size": size, "tenants": [tenant],
             "created_at": now, "last_access": now, "quarantined": False}
            for sha256, blob_id, size in blobs
        ]  # fmt: skip
        known = {docs[at]["_id"] for at in await insert_new(self.objects, docs)}
        if not known:
            return holders
        await self.objects.update_many(
            {"_id": {"$in": list(known)}, "quarantined": False},
            {"$addToSet": {"tenants": tenant}, "$set": {"last_access": now}},
        )
        async for existing in self.objects.find({"_id": {"$in": list(known)}}):
            sha256 = existing["_id"]
            if not existing.get("quarantined"):
                holders[sha256] = str(existing["blob"])
                continue
            # The stored copy was quarantined: this fresh one replaces it.
            fresh = next(item for item in blobs if item[0] == sha256)
            await self.objects.update_one(
                {"_id": sha256},
                {
                    "$set": {"blob": fresh[1], "size": fresh[2], "quarantined": False,
                             "last_access": now},
                    "$addToSet": {"tenants": tenant},
                },
            )  # fmt: skip
        return holders

    async def get_object(self, sha256: str) -> ObjectDoc | None:
        return await self.objects.find_one({"_id": sha256})

    async def get_objects(self, sha256s: list[str]) -> list[ObjectDoc]:
        """Those of the objects that are recorded, in a query per `LOOKUP_CHUNK`."""
        found: list[ObjectDoc] = []
        for at in range(0, len(sha256s), LOOKUP_CHUNK):
            wanted = sha256s[at : at + LOOKUP_CHUNK]
            found += await self.objects.find({"_id": {"$in": wanted}}).to_list()
        return found

    async def touch(self, sha256s: list[str]) -> None:
        """Stamp the objects' last use (an eviction hint: see `shared.mongo.ADVISORY`), in a
        statement per `LOOKUP_CHUNK`."""
        objects, now = self.objects.with_options(write_concern=ADVISORY), utcnow()
        for at in range(0, len(sha256s), LOOKUP_CHUNK):
            chunk = sha256s[at : at + LOOKUP_CHUNK]
            await objects.update_many({"_id": {"$in": chunk}}, {"$set": {"last_access": now}})

    async def quarantine(self, sha256: str) -> None:
        """Mark an object bad and forget every cached source listing it, so it is fetched anew."""
        await self.objects.update_one({"_id": sha256}, {"$set": {"quarantined": True}})
        await self.sources.delete_many({"files.sha256": sha256})

    async def lru(self, limit: int) -> list[ObjectDoc]:
        return await self.objects.find().sort("last_access", ASCENDING).limit(limit).to_list()

    async def forget_object(self, sha256: str) -> None:
        await self.objects.delete_one({"_id": sha256})
        await self.sources.delete_many({"files.sha256": sha256})

    async def pinned(self, now: datetime) -> set[str]:
        """Objects a live staging or grant names: eviction never touches these."""
        pins: set[str] = set()
        # Projected: these documents hold their `_id` and the field asked for, no more.
        async for staging in self.stagings.find({"state": {"$ne": "released"}}, {"objects": 1}):
            pins.update(staging.get("objects", []))
        live = {"revoked_at": None, "upload_until": {"$gt": now}}
        async for grant in self.grants.find(live, {"objects": 1}):
            pins.update(grant.get("objects", []))
        async for result in self.results.find({}, {"sha256": 1}):
            pins.add(result["sha256"])  # results are the tenant's until they are deleted
        return pins

    # -- sources ----------------------------------------------------------------------

    async def find_source(self, key: str) -> Document | None:
        return await self.sources.find_one({"_id": key})

    async def save_source(self, key: str, doc: Document) -> None:
        await self.sources.replace_one({"_id": key}, {"_id": key, **doc}, upsert=True)

    # -- stagings ---------------------------------------------------------------------

    async def open_staging(
        self, job_id: str, tenant: str, actor: str | None, inputs: list[Document]
    ) -> bool:
        """Record a job's staging; False if it exists (a redelivered command)."""
        try:
            await self.stagings.insert_one(
                {
                    "_id": job_id,
                    "tenant": tenant,
                    "actor": actor,
                    "inputs": inputs,
                    "state": "staging",
                    "staged": [],
                    "objects": [],
                    "announced": False,
                    "created_at": utcnow(),
                }
            )
            return True
        except DuplicateKeyError:
            return False

    async def get_staging(self, job_id: str) -> StagingDoc | None:
        return await self.stagings.find_one({"_id": job_id})

    async def unfinished_stagings(self) -> list[StagingDoc]:
        """Stagings a previous run of the datacache left running or unannounced."""
        return await self.stagings.find(
            {"$or": [{"state": "staging"}, {"announced": False}]}
        ).to_list()

    async def finish_staging(self, job_id: str, fields: dict[str, Any]) -> None:
        await self.stagings.update_one(
            {"_id": job_id, "state": "staging"}, {"$set": {**fields, "finished_at": utcnow()}}
        )

    async def mark_announced(self, job_id: str) -> None:
        await self.stagings.update_one({"_id": job_id}, {"$set": {"announced": True}})

    async def release_staging(self, job_id: str) -> None:
        await self.stagings.update_one(
            {"_id": job_id}, {"$set": {"state": "released", "released_at": utcnow()}}
        )

    # -- grants -----------------------------------------------------------------------

    async def put_grant(self, grant: GrantDoc) -> None:
        await self.grants.replace_one({"_id": grant["_id"]}, grant, upsert=True)

    async def live_grant(
        self, job_id: str, node_id: str, now: datetime, field: Deadline
    ) -> GrantDoc | None:
        """The unrevoked grant of `job_id` for `node_id` whose `field` deadline is ahead."""
        return await self.grants.find_one(
            {"job_id": job_id, "node_id": node_id, "revoked_at": None, field: {"$gt": now}},
            sort=[("attempt", -1)],
        )

    async def add_delegate(self, grant_id: str, digest: str) -> None:
        await self.grants.update_one({"_id": grant_id}, {"$addToSet": {"delegates": digest}})

    async def delegated_grant(self, digest: str) -> GrantDoc | None:
        """The grant a delegated token (by its digest) was issued under."""
        return await self.grants.find_one({"delegates": digest})

    async def any_grant(self, job_id: str) -> GrantDoc | None:
        """The latest grant of a job whatever its state (to explain a refusal)."""
        return await self.grants.find_one({"job_id": job_id}, sort=[("attempt", -1)])

    async def revoke_grants(self, job_id: str, below_attempt: int | None = None) -> int:
        """Revoke the job's grants (only those of attempts before `below_attempt`)."""
        query: Document = {"job_id": job_id, "revoked_at": None}
        if below_attempt is not None:
            query["attempt"] = {"$lt": below_attempt}
        result = await self.grants.update_many(query, {"$set": {"revoked_at": utcnow()}})
        return result.modified_count

    # -- results ----------------------------------------------------------------------

    async def put_result(
        self, job_id: str, attempt: int, tenant: str, path: str, sha256: str, size: int
    ) -> None:
        result: ResultDoc = {
            "job_id": job_id,
            "attempt": attempt,
            "tenant": tenant,
            "path": path,
            "sha256": sha256,
            "size": size,
            "stored_at": utcnow(),
        }
        await self.results.replace_one({"job_id": job_id, "path": path}, result, upsert=True)

    async def job_results(self, job_id: str, tenant: str | None = None) -> list[ResultDoc]:
        query: Document = {"job_id": job_id}
        if tenant is not None:
            query["tenant"] = tenant
        return await self.results.find(query).sort("path", ASCENDING).to_list()

    # -- uploads ----------------------------------------------------------------------

    async def open_upload(
        self, job_id: str, tenant: str, destination: str, envelope: Document
    ) -> Document | None:
        """Record an upload to do; None if it was recorded before (a repeated release)."""
        doc = {
            "_id": job_id,
            "tenant": tenant,
            "destination": destination,
            "state": "pending",
            "envelope": envelope,
            "created_at": utcnow(),
        }
        try:
            await self.uploads.insert_one(doc)
        except DuplicateKeyError:
            return None
        return doc

    async def pending_uploads(self) -> list[Document]:
        return await self.uploads.find({"state": "pending"}).to_list()

    async def finish_upload(self, job_id: str, ok: bool, detail: str) -> None:
        await self.uploads.update_one(
            {"_id": job_id},
            {
                "$set": {
                    "state": "done" if ok else "failed",
                    "detail": detail,
                    "finished_at": utcnow(),
                }
            },
        )
