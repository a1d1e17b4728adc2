"""What crosses a process boundary between gpufn's processes, as typed and versioned models.

- The **route entry**: a version's workflow publishes it in its memo (`workflows.routes.route_memo`) and
  every gateway applies it to its routing table (`api.gateway.routes.RouteTable.apply`).
- The **load report**: a gateway answers it on `GET /internal/v1/load` (`api.gateway.load_report`) and
  the workers' load monitors read it (`activities.gateway.LoadMonitor`).

During a rolling upgrade old and new processes read each other's messages, so parsing is tolerant both
ways: a field an older producer did not send gets its default, and a field a newer producer added is
kept as it came (passed on, never read). Each message carries `schema`, the version of its shape; a
message without one is version 1 (the shape before the field existed). A producer may add optional
fields within a version; a change an older reader would misread (a field renamed, removed or given
another meaning) needs a new version, and readers of the old version must be gone before a producer
sends it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ROUTE_SCHEMA = 1
"""Version of the route entry's shape that this code produces."""
LOAD_REPORT_SCHEMA = 1
"""Version of the load report's shape that this code produces."""


class Message(BaseModel):
    """A model read across processes: unknown fields are kept unread, so a newer producer can add some."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self, exclude_unset: bool = False) -> dict[str, Any]:
        """Return the message as the JSON object other processes read (field names as sent).

        With `exclude_unset`, a field that was neither given nor read is left out (its reader assumes
        its default), which keeps often-sent messages small.
        """
        return self.model_dump(mode="json", by_alias=True, exclude_unset=exclude_unset)


# --- Route entry ----------------------------------------------------------------------------------------


class RouteSpec(Message):
    """One deployment spec of a version, as far as routing needs it."""

    gpu: str | None = None
    instanceType: str | None = None
    backend: str | None = None
    maxRequestConcurrency: int = 1


class RouteInstance(Message):
    """One instance that takes requests: its id, its address and the spec it runs."""

    id: str
    address: str = ""
    spec: int = 0


class RouteEntry(Message):
    """What a gateway needs to route a version's invocations (and what the deployment list shows)."""

    schema_version: int = Field(default=ROUTE_SCHEMA, alias="schema")
    accountId: str
    functionId: str
    versionId: str
    functionName: str = ""
    status: str = "INACTIVE"
    deployed: bool = False
    """False while the deployment drains or is torn down: no new requests."""
    inferenceUrl: str | None = None
    specs: list[RouteSpec] = Field(default_factory=list)
    instances: list[RouteInstance] = Field(default_factory=list)
    """The instances that serve now (RUNNING, with an address, not draining)."""
    routesVersion: int = 0
    """Grows with every change; a gateway ignores an entry older than the one it applied."""
    rateLimit: dict[str, Any] | None = None
    deploymentId: str | None = None
    deployment: dict[str, Any] | None = None
    """The NVCF deployment fields `GET /v2/nvcf/deployments` lists besides the ones above."""

    @classmethod
    def parse(cls, data: Any) -> RouteEntry:
        """Read a route entry of any schema version (raises `pydantic.ValidationError`, a ValueError)."""
        return cls.model_validate(data)


# --- Load report ----------------------------------------------------------------------------------------


class VersionLoadEntry(Message):
    """One version's load at one gateway."""

    queued: int = 0
    inFlight: int = 0
    ready: int = 0
    """Instances the gateway routes to."""
    routesVersion: int = 0
    """The route entry the gateway applied when it counted (drains wait for the current one)."""
    instances: dict[str, int] = Field(default_factory=dict)
    """Requests in flight per instance id."""


class LoadReportBody(Message):
    """A gateway's load report: every version (`full`) or the versions changed since a generation."""

    schema_version: int = Field(default=LOAD_REPORT_SCHEMA, alias="schema")
    epoch: str = ""
    """Changes when the gateway restarts: a poller's `since` of another epoch gets a full report."""
    generation: int = 0
    full: bool = True
    versions: dict[str, VersionLoadEntry] = Field(default_factory=dict)
    removed: list[str] = Field(default_factory=list)
    """Versions gone since the poller's generation (empty in a full report)."""

    @classmethod
    def parse(cls, data: Any) -> LoadReportBody:
        """Read a load report of any schema version (raises `pydantic.ValidationError`, a ValueError)."""
        return cls.model_validate(data)
