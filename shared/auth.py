"""API tokens: created by `medhive token create`, stored hashed, bound to tenant and role.

Every HTTP API of medhive checks bearer tokens against one identity database, so a
token works for the job gateway and the audit API alike. Only the SHA-256 of a token
is stored: a leaked database does not leak usable tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from pymongo.asynchronous.database import AsyncDatabase

from shared.envelope import utcnow
from shared.identity import check_name
from shared.mongo import Document

TOKEN_PREFIX = "mh_"
#: Tokens the datacache issues itself, each reaching one grant's data (see
#: `services.datacache.grants.GrantService.delegate`); no other service knows them.
DELEGATED_PREFIX = "mhd_"


class Role(StrEnum):
    """`user`: a tenant's own jobs and events. `operator`: also every tenant's audit.
    `node`: a node agent (its token's name is the node id); reads only what a live
    grant lets that node read. `metrics`: a scraper such as Prometheus; reads `/metrics`
    and nothing else (its tenant is only a name)."""

    user = "user"
    operator = "operator"
    node = "node"
    metrics = "metrics"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and role a token is bound to."""

    name: str
    tenant: str
    role: Role
    #: For a delegated token: the one grant (`job:attempt`) whose data it reaches.
    grant: str | None = None


def token_digest(token: str) -> str:
    """What is stored of a token: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens in the identity database; lookups are cached for a few seconds, and the
    requests that miss the cache together share one lookup (a client with 64 requests
    in flight would otherwise send 64 the moment its entry expires)."""

    def __init__(self, db: AsyncDatabase[Document], cache_s: float = 5.0) -> None:
        self.tokens = db["tokens"]
        self.cache_s = cache_s
        #: Where tokens with `DELEGATED_PREFIX` are looked up (by digest), in the one
        #: service that issues them; elsewhere they are unknown.
        self.delegated: Callable[[str], Awaitable[Principal | None]] | None = None
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def create(self, name: str, tenant: str, role: Role) -> str:
        """Store a new token and return it; this is the only time it is visible."""
        check_name(tenant)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        await self.tokens.insert_one(
            {
                "_id": token_digest(token),
                "name": name,
                "tenant": tenant,
                "role": role.value,
                "created_at": utcnow(),
            }
        )
        return token

    async def verify(self, token: str) -> Principal | None:
        """The principal a token stands for, or None for an unknown token."""
        digest = token_digest(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        if (under_way := self._lookups.get(digest)) is not None:
            return await asyncio.shield(under_way)
        lookup = asyncio.ensure_future(self._lookup(digest, token.startswith(DELEGATED_PREFIX)))
        self._lookups[digest] = lookup
        try:
            return await asyncio.shield(lookup)
        finally:
            if lookup.done():
                self._lookups.pop(digest, None)
            else:  # this caller was cancelled: the others still wait for it
                lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))

    async def _lookup(self, digest: str, delegated: bool) -> Principal | None:
        principal: Principal | None = None
        if delegated:
            principal = None if self.delegated is None else await self.delegated(digest)
        elif (doc := await self.tokens.find_one({"_id": digest})) is not None:
            principal = Principal(name=doc["name"], tenant=doc["tenant"], role=Role(doc["role"]))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self.cache_s, principal)
        return principal
