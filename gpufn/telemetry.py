"""What the API process and the worker share for metrics and traces.

Metrics: serving a Prometheus registry on its own address. Traces: setting OpenTelemetry up from the
standard `OTEL_*` environment variables, only when they ask for it.

Each process keeps its metrics in its own `prometheus_client.CollectorRegistry` and, when the operator
names an address (`GPUFN_API_METRICS_ADDRESS`, `GPUFN_WORKER_METRICS_ADDRESS`), serves it at
`http://ADDRESS/metrics` without any key. Off by default: the metrics name function and version ids, which
are an account's business, so the operator chooses who can reach them (a loopback or cluster-internal
address, a NetworkPolicy) rather than the API's public port.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


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


TRACES_EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
_tracer: Tracer | None = None


def tracing_requested() -> bool:
    """Return whether the operator turned tracing on (`OTEL_TRACES_EXPORTER` set to an exporter).

    gpufn's tracing is off unless asked for, unlike the OpenTelemetry SDK's default (OTLP on): a stack
    without a collector must not spend time on spans nor log export failures. `OTEL_SDK_DISABLED=true`
    turns it off whatever the exporter says.
    """
    exporter = os.environ.get(TRACES_EXPORTER_ENV, "").strip().lower()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return bool(exporter) and exporter != "none" and not disabled


def configure_tracing(service_name: str) -> Tracer | None:
    """Install a tracer provider that exports as the `OTEL_*` variables say; None when tracing is off.

    `OTEL_TRACES_EXPORTER` is `otlp` (OTLP over HTTP; `OTEL_EXPORTER_OTLP_ENDPOINT` and friends configure it)
    or `console`; `OTEL_SERVICE_NAME` overrides `service_name`.
    """
    global _tracer
    if not tracing_requested():
        return None
    if _tracer is not None:
        return _tracer  # one provider per process, however many apps it builds
    from opentelemetry import trace
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)
    exporters: list[SpanExporter] = []
    for name in os.environ[TRACES_EXPORTER_ENV].split(","):
        name = name.strip().lower()
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name and name != "none":
            raise ValueError(f"{TRACES_EXPORTER_ENV}={name!r} is not supported: use otlp or console")
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("gpufn")
    return _tracer


def temporal_interceptors(service_name: str) -> list[Any]:
    """Return the Temporal client interceptors for tracing (workflows, activities, client calls); [] when off.

    A worker built on a client with these interceptors uses them too.
    """
    if configure_tracing(service_name) is None:
        return []
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]
