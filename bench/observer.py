"""CPU the gateway's observer adds to one request: metrics and request record, with tracing off and on.

    python bench/observer.py [--requests 200000]

Runs the observer's hooks exactly as the gateway calls them for one direct request (received, accepted,
instance_assigned, trace_headers, first_byte, finished) on real gateway objects (`Invocation`,
`VersionRoute`, `Instance`), with no network: the figure is the observer's own cost per request, free of
the noise of a loaded machine that an end-to-end run (bench/invoke.py) carries. Tracing on uses the
OpenTelemetry SDK with a span processor that drops spans (the export itself runs off the request path in
a real deployment's batch processor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from api.gateway.invocations import Invocation
from api.gateway.routes import Instance, VersionRoute
from api.gateway.upstream import Endpoint
from api.observability import GatewayObserver, MemoryRequestRecords

BODY = b'{"prompt": "hello", "max_tokens": 16}'


class _Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _run(observer: GatewayObserver, count: int) -> float:
    """Return the observer's CPU microseconds per request over `count` requests."""
    version = VersionRoute("ver-1", "fn-1", "acct")
    instance = Instance("ver-1-i0", Endpoint("http://127.0.0.1:1"))
    version.active = [instance]
    started = time.process_time()
    for n in range(count):
        invocation = Invocation(f"req-{n}", version, "acct", b"key", BODY, b"", False, 60.0)
        observer.received(invocation, False)
        observer.accepted(invocation)
        invocation.instance = instance
        observer.instance_assigned(invocation)
        observer.trace_headers(invocation)
        observer.first_byte(invocation)
        observer.finished(invocation, 200, 64)
    return (time.process_time() - started) / count * 1e6


def _baseline(count: int) -> float:
    """Return the CPU microseconds per request of building the invocation alone (subtracted)."""
    version = VersionRoute("ver-1", "fn-1", "acct")
    started = time.process_time()
    for n in range(count):
        Invocation(f"req-{n}", version, "acct", b"key", BODY, b"", False, 60.0)
    return (time.process_time() - started) / count * 1e6


def main() -> int:
    """Print the observer's cost per request, tracing off and on."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    args = parser.parse_args()
    records = args.requests  # keep every record, as a busy replica within its retention does
    base = min(_baseline(args.requests) for _ in range(3))
    off = min(
        _run(GatewayObserver(records=MemoryRequestRecords(3600, records)), args.requests) for _ in range(3)
    )
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    tracer = provider.get_tracer("bench")
    on = min(
        _run(GatewayObserver(records=MemoryRequestRecords(3600, records), tracer=tracer), args.requests)
        for _ in range(3)
    )
    print(f"observer, tracing off: {off - base:.1f} us of CPU per request (metrics + record)")
    print(f"observer, tracing on:  {on - base:.1f} us of CPU per request (metrics + record + 4 spans)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
