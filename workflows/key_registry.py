"""The key registry: one entity workflow holding every account's API keys, hashed.

Plain keys never reach Temporal: the API hashes a new key before the `create_key` update, and the
registry keeps only the SHA-256 digest, the account and the scopes. API replicas cache the registry
(refreshed by query) so authenticating a request never calls Temporal.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field
from temporalio import workflow


class ApiKeyRecord(BaseModel):
    """One API key, without the key itself."""

    keyId: str
    account: str
    scopes: list[str]
    keyHash: str
    description: str = ""
    createdAt: datetime
    revoked: bool = False


class KeyRegistryState(BaseModel):
    """All keys, carried across continue-as-new."""

    keys: list[ApiKeyRecord] = Field(default_factory=list)


class KeyRegistryInput(BaseModel):
    """Input of the key registry workflow."""

    state: KeyRegistryState = Field(default_factory=KeyRegistryState)


class RevokeKeyRequest(BaseModel):
    """Update `revoke_key`."""

    keyId: str


class KeyList(BaseModel):
    """Result of the `list_keys` query."""

    keys: list[ApiKeyRecord]


@workflow.defn
class KeyRegistryWorkflow:
    """Holds the hashed API keys of every account."""

    @workflow.init
    def __init__(self, input: KeyRegistryInput) -> None:
        self._state = input.state

    @workflow.run
    async def run(self, input: KeyRegistryInput) -> None:
        """Live forever, continuing as new when the history grows."""
        await workflow.wait_condition(lambda: workflow.info().is_continue_as_new_suggested())
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(KeyRegistryInput(state=self._state))

    @workflow.query
    def list_keys(self) -> KeyList:
        """Return every key that is not revoked."""
        return KeyList(keys=[k for k in self._state.keys if not k.revoked])

    @workflow.update
    def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        """Add a key (its hash)."""
        self._state.keys.append(record)
        return record

    @create_key.validator
    def _validate_create_key(self, record: ApiKeyRecord) -> None:
        if any(k.keyId == record.keyId or k.keyHash == record.keyHash for k in self._state.keys):
            raise ValueError("A key with this id already exists")

    @workflow.update
    def revoke_key(self, request: RevokeKeyRequest) -> ApiKeyRecord:
        """Revoke a key; it stops working on every replica within a refresh interval."""
        for key in self._state.keys:
            if key.keyId == request.keyId and not key.revoked:
                key.revoked = True
                return key
        raise LookupError(request.keyId)

    @revoke_key.validator
    def _validate_revoke_key(self, request: RevokeKeyRequest) -> None:
        if not any(k.keyId == request.keyId and not k.revoked for k in self._state.keys):
            raise LookupError(f"Key '{request.keyId}' not found")
