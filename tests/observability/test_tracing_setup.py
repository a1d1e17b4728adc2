"""Tracing is set up from the standard OTEL_* variables only when they ask for it (run in fresh processes,
as the API and the worker read them at start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = """
from gpufn.telemetry import configure_tracing, temporal_interceptors
tracer = configure_tracing("gpufn-test")
interceptors = temporal_interceptors("gpufn-test")
print("INTERCEPTORS", [type(i).__name__ for i in interceptors], flush=True)
if tracer is not None:
    with tracer.start_as_current_span("probe"):
        pass
    from opentelemetry import trace
    trace.get_tracer_provider().shutdown()
"""


def run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_tracing_is_off_without_an_exporter() -> None:
    for env in ({}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert "INTERCEPTORS []" in run(**env)
    assert "INTERCEPTORS []" in run(OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true")


def test_console_exporter_emits_spans_with_the_service_name() -> None:
    out = run(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="my-gateway")
    assert "INTERCEPTORS ['TracingInterceptor']" in out
    span_text = out[out.index("{") : out.rindex("}") + 1]
    span = json.loads(span_text)
    assert span["name"] == "probe"
    assert span["resource"]["attributes"]["service.name"] == "my-gateway"
