"""API keys: generation, hashing, and the in-memory cache every request authenticates against.

The cache is refreshed from the key registry workflow in the background (and at once, at most once a
second, when an unknown key shows up on the management API), so a request never waits on Temporal to
be authenticated, and a key created or revoked on one replica reaches the others within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
import uuid
from datetime import UTC, datetime

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.principal import ALL_SCOPES, Principal
from workflows import KEY_REGISTRY_WORKFLOW_ID, TASK_QUEUE
from workflows.key_registry import (
    ApiKeyRecord,
    KeyRegistryInput,
    KeyRegistryWorkflow,
    RevokeKeyRequest,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "nvapi-"
REFRESH_SECONDS = 1.0
MISS_REFRESH_SECONDS = 1.0


def hash_key(key: str) -> str:
    """Return the stored form of a key (keys are 48 random bytes, so a plain digest is enough)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """Return a fresh key that looks like NVCF's personal keys."""
    return KEY_PREFIX + secrets.token_urlsafe(48)


def key_registry_workflow_id(task_queue: str) -> str:
    """Return the ID of the key registry of the stack that serves `task_queue`.

    The registry runs on its stack's task queue, so two stacks sharing one Temporal namespace (tests, a
    staging stack beside production) must not share one registry: the other stack's registry would be
    served by workers that may be gone. The default queue keeps the plain ID.
    """
    if task_queue == TASK_QUEUE:
        return KEY_REGISTRY_WORKFLOW_ID
    return f"{KEY_REGISTRY_WORKFLOW_ID}:{task_queue}"


def bearer(header: str | None) -> str | None:
    """Return the key of an `Authorization: Bearer <key>` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class KeyCache:
    """Every key of every account, by hash, kept fresh from the key registry workflow."""

    def __init__(self, client: Client, task_queue: str, admin_key: str, admin_account: str) -> None:
        self._client = client
        self._task_queue = task_queue
        self._admin_hash = hash_key(admin_key)
        self._admin = Principal(account=admin_account, key_id="admin", scopes=ALL_SCOPES, admin=True)
        self._by_hash: dict[str, Principal] = {}
        self._records: list[ApiKeyRecord] = []
        self._last_refresh = 0.0
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._workflow_id = key_registry_workflow_id(task_queue)

    def _handle(self) -> WorkflowHandle[KeyRegistryWorkflow, None]:
        return self._client.get_workflow_handle_for(KeyRegistryWorkflow.run, self._workflow_id)

    async def start(self) -> None:
        """Make sure the registry workflow runs, load the keys, and keep them fresh."""
        # Every API start after the first finds the registry running: that is the normal case.
        with contextlib.suppress(RPCError, WorkflowAlreadyStartedError):
            await self._client.start_workflow(
                KeyRegistryWorkflow.run,
                KeyRegistryInput(),
                id=self._workflow_id,
                task_queue=self._task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            )
        with contextlib.suppress(RPCError):
            await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def authenticate(self, header: str | None) -> Principal | None:
        """Return the principal of an `Authorization` header value, from memory only."""
        key = bearer(header)
        if key is None:
            return None
        digest = hash_key(key)
        if secrets.compare_digest(digest, self._admin_hash):
            return self._admin
        return self._by_hash.get(digest)

    async def authenticate_fresh(self, header: str | None) -> Principal | None:
        """Like `authenticate`, but refresh once (rate-limited) when the key is unknown here yet."""
        principal = self.authenticate(header)
        if (
            principal is None
            and bearer(header)
            and time.monotonic() - self._last_refresh > MISS_REFRESH_SECONDS
        ):
            with contextlib.suppress(RPCError):
                await self.refresh()
            principal = self.authenticate(header)
        return principal

    @property
    def records(self) -> list[ApiKeyRecord]:
        """Return every live key (without the keys themselves)."""
        return list(self._records)

    async def refresh(self) -> None:
        """Reload every key from the registry workflow."""
        async with self._refresh_lock:
            self._last_refresh = time.monotonic()
            listing = await self._handle().query(KeyRegistryWorkflow.list_keys)
            self._install(listing.keys)

    def _install(self, records: list[ApiKeyRecord]) -> None:
        self._records = records
        self._by_hash = {
            r.keyHash: Principal(account=r.account, key_id=r.keyId, scopes=frozenset(r.scopes))
            for r in records
        }

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh()
            except RPCError as err:
                log.warning("Key refresh failed: %s", err)
            except Exception:
                log.exception("Key refresh failed")

    async def create(self, account: str, scopes: list[str], description: str) -> tuple[str, ApiKeyRecord]:
        """Create a key; return the key (shown once) and its record."""
        key = new_key()
        record = ApiKeyRecord(
            keyId=str(uuid.uuid4()),
            account=account,
            scopes=sorted(set(scopes)),
            keyHash=hash_key(key),
            description=description,
            createdAt=datetime.now(UTC),
        )
        # Under the refresh lock, so a refresh that read the registry before this change cannot install
        # its stale list after it (which would hide a new key, or revive a revoked one, for a second).
        async with self._refresh_lock:
            await self._handle().execute_update(KeyRegistryWorkflow.create_key, record)
            self._install([*self._records, record])
        return key, record

    async def revoke(self, key_id: str) -> None:
        """Revoke a key everywhere."""
        async with self._refresh_lock:
            await self._handle().execute_update(
                KeyRegistryWorkflow.revoke_key, RevokeKeyRequest(keyId=key_id)
            )
            self._install([r for r in self._records if r.keyId != key_id])
