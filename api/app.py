"""The API process: NVCF's management API (FastAPI) with the invocation gateway in front of it.

`create_app(settings)` returns one ASGI callable. Invocation paths go straight to the gateway (no
FastAPI routing or validation on the hot path); everything else goes to FastAPI. The lifespan builds
the Temporal client, the key cache, the registry, the gateway and its route poller once.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send
from temporalio.client import Client, RPCTimeoutOrCancelledError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from api.auth import KeyCache
from api.deps import MAX_MANAGEMENT_BODY, AppContext, plain_path_ids
from api.gateway import Gateway, GatewaySettings
from api.observability import GatewayObserver, MemoryRequestRecords
from api.openapi import install_openapi
from api.problems import PROBLEM_CONTENT_TYPE, ProblemError, problem_body
from api.registry import FunctionRegistry
from api.route_lookup import TemporalRouteSource
from api.route_sync import RouteSync
from api.routes import deployments, functions, keys, requests, system
from api.schemas import describe_errors
from gpufn.cluster_groups import ClusterGroups
from gpufn.inventory import discover_gpus, local_cluster_group, parse_local_gpus
from gpufn.sealing import SecretBox
from gpufn.settings import Settings
from gpufn.telemetry import configure_tracing, serve_metrics, temporal_interceptors

log = logging.getLogger(__name__)

CONTROL_PLANE_RETRY_AFTER = "2"
"""Seconds a client is told to wait before retrying a call that Temporal failed."""
NVCF_PREFIXES = ("/v2/nvcf", "/v2/orgs/{org}/nvcf", "/v2/orgs/{org}/teams/{team}/nvcf")


def problem_response(
    status: int, detail: str, instance: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Return an RFC 9457 problem response."""
    return JSONResponse(
        problem_body(status, detail, instance),
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.status, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(400, _validation_detail(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 400 and detail == FASTAPI_BODY_PARSE_ERROR:
            # FastAPI's answer to a body json.loads refuses other than by JSONDecodeError: invalid
            # UTF-8, nesting deeper than the parser's recursion limit, an integer over Python's digit limit.
            detail = "Malformed JSON body: not valid UTF-8 JSON within the parser's limits"
        return problem_response(exc.status_code, detail, request.url.path)

    @app.exception_handler(RPCError)
    async def _temporal(request: Request, exc: RPCError) -> JSONResponse:
        log.error("Temporal call failed on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            503,
            f"The control plane is unavailable: {exc.message}",
            request.url.path,
            {"Retry-After": CONTROL_PLANE_RETRY_AFTER},
        )

    @app.exception_handler(RPCTimeoutOrCancelledError)
    async def _temporal_timeout(request: Request, exc: Exception) -> JSONResponse:
        # The change may or may not have been applied: the caller retries, and updates are idempotent.
        log.error("Temporal call timed out on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            503,
            "The control plane did not answer in time; retry the request",
            request.url.path,
            {"Retry-After": CONTROL_PLANE_RETRY_AFTER},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unexpected error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error; the server log has the details", request.url.path)


FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


def _validation_detail(errors: Sequence[Any]) -> str:
    """Return the detail of a 400 for FastAPI's validation errors, with the API's own wording."""
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return f"Malformed JSON body: {reason} (at character {loc[-1] if len(loc) > 1 else 0})"
        if loc == ("body",) and error.get("type") in ("missing", "model_attributes_type", "dict_type"):
            return "The request body must be a JSON object"
    return describe_errors(errors)


def build_cluster_groups(settings: Settings) -> ClusterGroups:
    """Return the cluster groups this installation serves: `local`, plus one per configured cluster."""
    from gpufn.kube_inventory import kube_cluster_groups

    gpus = parse_local_gpus(settings.local_gpus) if settings.local_gpus is not None else discover_gpus()
    groups: list[dict[str, Any]] = [local_cluster_group(gpus, settings.local_cpu_slots)]
    refresh = settings.kube_inventory_refresh
    return kube_cluster_groups(groups, settings.kubeconfigs, refresh_seconds=refresh)


async def connect(settings: Settings) -> Client:
    """Connect to Temporal with the pydantic data converter."""
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        interceptors=temporal_interceptors("gpufn-api"),
    )


def create_fastapi(settings: Settings, client: Client | None = None) -> FastAPI:
    """Build the management API (without the gateway in front)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        temporal = client or await connect(settings)
        key_cache = KeyCache(
            temporal, settings.task_queue, settings.resolved_admin_key(), settings.admin_account
        )
        await key_cache.start()
        gateway = _build_gateway(settings, key_cache, TemporalRouteSource(temporal))
        await gateway.start()
        context = AppContext(
            settings=settings,
            client=temporal,
            keys=key_cache,
            registry=FunctionRegistry(temporal, settings.task_queue, settings.deploy_timeout),
            secret_box=SecretBox(settings.resolved_secret_key()),
            cluster_groups=build_cluster_groups(settings),
            gateway=gateway,
            route_sync=RouteSync(temporal, gateway.routes, settings.routes_poll_interval),
        )
        await context.route_sync.start()
        app.state.context = context
        stop_metrics = (
            serve_metrics(settings.api_metrics_address, gateway.observer.metrics.registry)
            if settings.api_metrics_address
            else None
        )
        try:
            yield
        finally:
            if stop_metrics is not None:
                stop_metrics()
            await context.route_sync.close()
            await gateway.close()
            await key_cache.close()

    app = FastAPI(
        title="gpufn",
        description="Serverless GPU functions, NVCF-compatible (`/v2/nvcf/...`), orchestrated by Temporal.",
        version="0.1.0",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    install_openapi(app)
    nvcf = APIRouter(dependencies=[Depends(plain_path_ids)])
    nvcf.include_router(functions.router)
    nvcf.include_router(deployments.router)
    for prefix in NVCF_PREFIXES:
        app.include_router(nvcf, prefix=prefix)
    app.include_router(keys.router)
    app.include_router(requests.router)
    app.include_router(system.router)
    return app


def _build_gateway(settings: Settings, key_cache: KeyCache, route_source: TemporalRouteSource) -> Gateway:
    """Build the invocation gateway of this replica.

    A replica's id defaults to its host name, and its peers to the other replicas of `gateway_urls`
    keyed by their host name's first label: in the Helm chart's StatefulSet that is each pod's name, so
    request ids name the pod that holds a result and any replica can forward a poll to it.
    """
    replica_id = settings.replica_id or socket.gethostname()
    peers = dict(settings.peers) or {
        (urlsplit(url).hostname or url).split(".")[0]: url for url in settings.gateway_urls
    }
    peers.pop(replica_id, None)
    return Gateway(
        authenticate=key_cache.authenticate,
        route_source=route_source,
        observer=GatewayObserver(
            records=MemoryRequestRecords(settings.request_record_retention, settings.request_record_max),
            tracer=configure_tracing("gpufn-api"),
        ),
        settings=GatewaySettings(
            result_ttl_seconds=settings.result_ttl,
            result_memory_bytes=settings.result_memory_bytes,
            max_queue_depth=settings.max_queue_depth,
            replica_id=replica_id,
            peers=peers,
            peer_key=settings.resolved_admin_key(),
            nats_url=settings.nats_url,
            result_retention_bytes_per_account=settings.result_retention_bytes_per_account,
        ),
    )


class GpufnApp:
    """The top-level ASGI app: invocation paths to the gateway, the rest to FastAPI."""

    def __init__(self, fastapi_app: FastAPI) -> None:
        self.fastapi = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] == "http":
            context = getattr(self.fastapi.state, "context", None)
            gateway = context.gateway if context is not None else None
            if gateway is not None and await gateway.handle(scope, receive, send):
                return
            bounded = await _bounded_body(scope, receive, send)
            if bounded is None:
                return
            receive = bounded
        await self.fastapi(scope, receive, send)


async def _bounded_body(scope: Scope, receive: Receive, send: Send) -> Receive | None:
    """Read a management request's body up to MAX_MANAGEMENT_BODY; answer 413 beyond (None), else replay it.

    FastAPI reads a body whole before validating it, so the bound must hold before FastAPI sees it.
    """
    limit = MAX_MANAGEMENT_BODY
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            await _send_problem(send, 413, f"Request body larger than {limit} bytes", scope.get("path"))
            return None
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return _disconnected  # the client left
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await _send_problem(send, 413, f"Request body larger than {limit} bytes", scope.get("path"))
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed() -> Message:
        return replay.pop() if replay else await receive()

    return replayed


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


async def _send_problem(send: Send, status: int, detail: str, instance: str | None) -> None:
    body = json.dumps(problem_body(status, detail, instance)).encode()
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings | None = None, client: Client | None = None) -> GpufnApp:
    """Return the API's ASGI app."""
    return GpufnApp(create_fastapi(settings or Settings(), client))
