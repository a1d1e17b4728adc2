"""What the API process and the worker share for metrics: serving a Prometheus registry on its own address.

Each process keeps its metrics in its own `prometheus_client.CollectorRegistry` and, when the operator
names an address (`GPUFN_API_METRICS_ADDRESS`, `GPUFN_WORKER_METRICS_ADDRESS`), serves it at
`http://ADDRESS/metrics` without any key. Off by default: the metrics name function and version ids, which
are an account's business, so the operator chooses who can reach them (a loopback or cluster-internal
address, a NetworkPolicy) rather than the API's public port.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server


def parse_address(address: str) -> tuple[str, int]:
    """Split `HOST:PORT` (or `:PORT`, meaning all interfaces; `[v6]:PORT` for IPv6) into host and port.

    Raises:
        ValueError: The address has no port or the port is not a number from 0 to 65535.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics address {address!r} must be HOST:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def serve_metrics(address: str, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve `registry` at http://`address`/metrics (any path answers) in a thread; return its stop."""
    host, port = parse_address(address)
    server, thread = start_http_server(port, host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
