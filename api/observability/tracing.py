"""OpenTelemetry spans of one invocation in the gateway: the request, its queue wait, cold start and call.

Used by `GatewayObserver` only when the process has a tracer (`OTEL_TRACES_EXPORTER` set); without one
nothing here runs and no span object exists. Spans of phases that are only known once they ended (the queue
wait, the cold start) are recorded afterwards with their real start and end times.

The invocation span continues the client's trace when the request carries a W3C `traceparent`; the
instance receives a `traceparent` naming the instance-call span, so the function's own spans join the trace
(the client's `traceparent` and `tracestate` are replaced, not forwarded twice).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from api.observability.records import RequestRecord

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class InvocationTrace:
    """The open spans of one invocation."""

    __slots__ = ("call", "context", "root")

    def __init__(self, root: trace.Span, context: Any) -> None:
        self.root = root
        self.context = context
        """The OpenTelemetry context whose current span is `root` (the children's parent)."""
        self.call: trace.Span | None = None


def _wall_ns(record: RequestRecord, moment: float) -> int:
    return int((record.received_wall + (moment - record.received)) * 1e9)


def split_trace_headers(client_headers: bytes) -> tuple[bytes, dict[str, str]]:
    """Return the serialized client headers without `traceparent`/`tracestate`, and those two by name."""
    if b"trace" not in client_headers:
        return client_headers, {}
    kept: list[bytes] = []
    carrier: dict[str, str] = {}
    for line in client_headers.split(b"\r\n"):
        name, _, value = line.partition(b": ")
        if name in _TRACE_HEADERS:
            carrier[name.decode()] = value.decode("latin-1")
        elif line:
            kept.append(line + b"\r\n")
    return b"".join(kept), carrier


def start(tracer: Tracer, record: RequestRecord, carrier: dict[str, str]) -> InvocationTrace:
    """Open the invocation's span (a child of the client's trace when `carrier` names one)."""
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    root = tracer.start_span(
        "gpufn.invoke",
        context=parent,
        kind=SpanKind.SERVER,
        start_time=_wall_ns(record, record.received),
        attributes={
            "gpufn.request_id": record.request_id,
            "gpufn.function_id": record.function_id,
            "gpufn.function_version_id": record.version_id,
            "gpufn.cold_start": record.cold,
            "http.request.body.size": record.request_bytes,
        },
    )
    return InvocationTrace(root, trace.set_span_in_context(root))


def assigned(tracer: Tracer, state: InvocationTrace, record: RequestRecord, instance_id: str | None) -> None:
    """Record the queue wait and cold start that just ended, and open the instance call's span."""
    assert record.assigned is not None
    end = _wall_ns(record, record.assigned)
    if state.call is None:
        begin = _wall_ns(record, record.received)
        tracer.start_span("gpufn.queue", context=state.context, start_time=begin).end(end_time=end)
        if record.cold and record.cold_ready is not None:
            ready = _wall_ns(record, record.cold_ready)
            tracer.start_span("gpufn.cold_start", context=state.context, start_time=begin).end(end_time=ready)
    else:
        state.call.set_attribute("gpufn.retried", True)
        state.call.end(end_time=end)
    state.call = tracer.start_span(
        "gpufn.instance_call",
        context=state.context,
        kind=SpanKind.CLIENT,
        start_time=end,
        attributes={"gpufn.instance_id": instance_id or ""},
    )


def traceparent(state: InvocationTrace) -> bytes:
    """Return the header lines that carry the instance call's span to the function."""
    if state.call is None:
        return b""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(state.call))
    return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode("latin-1")) for k, v in carrier.items())


def finish(state: InvocationTrace, record: RequestRecord) -> None:
    """End the spans of a request that ended (answered, refused or cancelled)."""
    end = _wall_ns(record, record.done) if record.done is not None else None
    if state.call is not None:
        if record.first_byte is not None:
            state.call.add_event("first_byte", timestamp=_wall_ns(record, record.first_byte))
        if record.status is not None:
            state.call.set_attribute("http.response.status_code", record.status)
        state.call.end(end_time=end)
    root = state.root
    if record.status is not None:
        root.set_attribute("http.response.status_code", record.status)
        if record.status >= 500:
            root.set_status(Status(StatusCode.ERROR))
    root.set_attribute("gpufn.outcome", record.outcome or "")
    root.set_attribute("http.response.body.size", record.response_bytes)
    root.end(end_time=end)
