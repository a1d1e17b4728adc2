"""How one gateway replica behaves: poll windows, limits, result retention, its identity and peers."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of the invocation gateway of one API replica.

    A plain frozen dataclass: built once at startup (the API's pydantic settings can fill it), never
    validated per request.
    """

    default_poll_seconds: int = 5
    """How long an invocation waits for its result when the client sends no NVCF-POLL-SECONDS."""
    max_poll_seconds: int = 3600
    """The largest NVCF-POLL-SECONDS accepted; larger values (or non-integers) are a 400."""
    result_ttl_seconds: float = 3600.0
    """How long a finished result waits for its poll before it is dropped."""
    result_memory_bytes: int = 512 * MIB
    """Bound on the results waiting for their poll; beyond it the oldest are dropped first."""
    max_queue_depth: int = 10_000
    """Requests waiting per version (per replica) before new ones are refused with 429."""
    max_request_bytes: int = 5 * MIB
    """Largest inline request body; larger bodies are refused with 413."""
    max_response_bytes: int = 5 * MIB
    """Largest inline response (told to instances as NVCF-MAX-RESPONSE-SIZE-BYTES); larger is errored."""
    request_timeout_seconds: float = 3600.0
    """Overall budget of one invocation, queueing included; past it the request fails with 504."""
    stream_keepalive_seconds: float = 20.0
    """A streaming invocation (`Accept: text/event-stream`) still waiting for its first byte after this long
    starts its response and gets an SSE comment line this often, so proxies do not cut it; 0: never."""
    connect_timeout_seconds: float = 5.0
    """How long to wait for a connection to an instance before trying another one."""
    upstream_idle_seconds: float = 4.0
    """Idle keep-alive connections to instances are not reused after this long."""
    replica_id: str = "local"
    """This API replica's id; request ids carry it so another replica can forward a status poll."""
    peers: dict[str, str] = field(default_factory=dict)
    """Other replicas: replica id -> base URL, for forwarding status and position polls."""
    peer_key: str = ""
    """The key this replica presents to its peers when it tells them of a route change (the admin key)."""
    peer_timeout_seconds: float = 1.0
    """How long a route change waits for each peer's acknowledgement before it goes on without it."""
    region: str = "local"
    """Sent to instances as NVCF-REGION and NVCF-INVOCATION-REGION."""
    environment: str = "gpufn"
    """Sent to instances as NVCF-ENV."""
    nats_url: str | None = None
    """The NATS server of the shared, durable invocation plane; None keeps queues and results in memory."""
    result_retention_bytes_per_account: int = 1024 * MIB
    """Bound on the durable 202 results one account keeps waiting for their poll (with `nats_url`)."""
    maintenance_interval_seconds: float = 1.0
    """How often expired results, timed-out queued requests and idle connections are swept."""
