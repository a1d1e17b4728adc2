"""The API process: NVCF's management API (FastAPI) with the invocation gateway in front of it.

`create_app(settings)` returns one ASGI callable. Invocation paths go straight to the gateway (no
FastAPI routing or validation on the hot path); everything else goes to FastAPI. The lifespan builds
the Temporal client, the key cache, the registry, the gateway and its route poller once.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from api.auth import KeyCache
from api.deps import AppContext
from api.gateway import Gateway, GatewaySettings
from api.problems import PROBLEM_CONTENT_TYPE, ProblemError, problem_body
from api.registry import FunctionRegistry
from api.route_sync import RouteSync
from api.routes import deployments, functions, keys, system
from gpufn.cluster_groups import ClusterGroups
from gpufn.inventory import discover_gpus, local_cluster_group
from gpufn.sealing import SecretBox
from gpufn.settings import Settings

log = logging.getLogger(__name__)

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
        parts = [f"[field={'.'.join(str(p) for p in e['loc'])}, message={e['msg']}]" for e in exc.errors()]
        return problem_response(400, "Validation failed: " + ", ".join(parts), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No such endpoint: {request.method} {request.url.path}"
        return problem_response(exc.status_code, detail, request.url.path)

    @app.exception_handler(RPCError)
    async def _temporal(request: Request, exc: RPCError) -> JSONResponse:
        log.error("Temporal call failed on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(503, f"The control plane is unavailable: {exc.message}", request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("Unexpected error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error; the server log has the details", request.url.path)


def build_cluster_groups(settings: Settings) -> ClusterGroups:
    """Return the cluster groups this installation serves: `local`, plus one per configured cluster."""
    from activities.local import parse_local_gpus
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
        gateway = _build_gateway(settings, key_cache)
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
        try:
            yield
        finally:
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
    nvcf = APIRouter()
    nvcf.include_router(functions.router)
    nvcf.include_router(deployments.router)
    for prefix in NVCF_PREFIXES:
        app.include_router(nvcf, prefix=prefix)
    app.include_router(keys.router)
    app.include_router(system.router)
    return app


def _build_gateway(settings: Settings, key_cache: KeyCache) -> Gateway:
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
        settings=GatewaySettings(
            result_ttl_seconds=settings.result_ttl,
            result_memory_bytes=settings.result_memory_bytes,
            max_queue_depth=settings.max_queue_depth,
            replica_id=replica_id,
            peers=peers,
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
        await self.fastapi(scope, receive, send)


def create_app(settings: Settings | None = None, client: Client | None = None) -> GpufnApp:
    """Return the API's ASGI app."""
    return GpufnApp(create_fastapi(settings or Settings(), client))
