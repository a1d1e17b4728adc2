"""Function registry endpoints (NVCF reference sections 1 and 2)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

from api.deps import Context, FunctionId, VersionId, require
from api.principal import Principal
from api.problems import ProblemError
from api.registry import not_found
from api.responses import FunctionIdsResponse, FunctionListResponse, FunctionResponse
from api.schemas import (
    CreateFunctionRequest,
    RateLimitRequest,
    UpdateFunctionRequest,
    UpdateMetadataRequest,
    UpdateSecretsRequest,
)
from gpufn.sealing import SecretBox, secret_context
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import (
    DeleteRequest,
    FunctionStatus,
    FunctionVersionSpec,
    Health,
    InstanceStatus,
    UpdateTagsRequest,
    VersionState,
)
from workflows.models import UpdateSecretsRequest as WorkflowSecretsUpdate
from workflows.routes import function_json

router = APIRouter(tags=["functions"])

Lister = Annotated[Principal, Depends(require("list_functions", "list_functions_details"))]
Registrar = Annotated[Principal, Depends(require("register_function"))]
Updater = Annotated[Principal, Depends(require("update_function"))]
Deleter = Annotated[Principal, Depends(require("delete_function"))]
SecretsUpdater = Annotated[Principal, Depends(require("update_secrets"))]
Visibility = Annotated[list[str] | None, Query()]

DEFAULT_HEALTH_URI = "/v2/health/ready"
DEFAULT_PORT = 8000


def build_version(
    body: CreateFunctionRequest, account: str, function_id: str, box: SecretBox
) -> FunctionVersionSpec:
    """Turn a create request into the stored version: ids, NVCF's defaults, and secrets sealed."""
    version_id = str(uuid.uuid4())
    if body.health is not None:
        health = Health(
            protocol="gRPC" if body.health.protocol.upper() == "GRPC" else "HTTP",
            uri=body.health.uri,
            port=body.health.port,
            timeout=body.health.timeout,
            expectedStatusCode=body.health.expectedStatusCode,
        )
    else:
        health = Health(
            protocol="gRPC" if body.inferenceUrl == "/grpc" else "HTTP",
            uri=body.healthUri or DEFAULT_HEALTH_URI,
            port=body.inferencePort or DEFAULT_PORT,
        )
    secrets = body.secrets or []
    return FunctionVersionSpec(
        id=function_id,
        versionId=version_id,
        ncaId=account,
        name=body.name,
        description=body.description if body.description is not None else body.name,
        inferenceUrl=body.inferenceUrl,
        inferencePort=body.inferencePort,
        health=health,
        healthUri=health.uri,
        containerImage=body.containerImage,
        containerArgs=body.containerArgs,
        containerEnvironment=body.environment(),
        helmChart=body.helmChart,
        helmChartServiceName=body.helmChartServiceName,
        models=body.artifacts(body.models),
        resources=body.artifacts(body.resources),
        apiBodyFormat=body.apiBodyFormat,
        functionType=body.functionType,
        tags=body.tags or [],
        secretNames=[s.name for s in secrets],
        encryptedSecrets={s.name: box.seal(s.text, secret_context(version_id, s.name)) for s in secrets},
        rateLimit=body.rateLimit.model_dump(exclude_none=True) if body.rateLimit else None,
        telemetries=body.telemetries.model_dump(exclude_none=True) if body.telemetries else None,
        createdAt=datetime.now(UTC),
    )


def version_json(state: VersionState, include_secrets: bool = True) -> dict[str, Any]:
    """Return a version as NVCF's Function object, with its active instances when deployed."""
    body = function_json(state)
    if not include_secrets:
        body.pop("secrets", None)
    deployment = state.deployment
    if deployment is not None and state.instances:
        body["activeInstances"] = [
            {
                "instanceId": i.instanceId,
                "functionId": state.spec.id,
                "functionVersionId": state.spec.versionId,
                "instanceType": deployment.specifications[i.specIndex].instanceType,
                "instanceStatus": "RUNNING" if i.status == InstanceStatus.RUNNING else i.status.value,
                "ncaId": state.spec.ncaId,
                "gpu": deployment.specifications[i.specIndex].gpu,
                "backend": deployment.specifications[i.specIndex].backend
                or deployment.specifications[i.specIndex].clusterGroup,
                "location": deployment.specifications[i.specIndex].clusterGroup,
                "instanceCreatedAt": i.createdAt.isoformat().replace("+00:00", "Z") if i.createdAt else None,
            }
            for i in state.instances
            if i.specIndex < len(deployment.specifications)
        ]
    return body


def _only_private(visibility: list[str] | None) -> bool:
    """Return whether the listing includes the account's own functions (`private`, the default)."""
    if not visibility:
        return True
    allowed = {"authorized", "private", "public"}
    for value in visibility:
        for item in value.split(","):
            if item.strip().lower() not in allowed:
                raise ProblemError(400, f"Invalid visibility '{item}': use authorized, private or public")
    return any(item.strip().lower() == "private" for value in visibility for item in value.split(","))


@router.post("/functions", response_model=FunctionResponse, response_model_exclude_unset=True)
async def create_function(
    body: CreateFunctionRequest, principal: Registrar, context: Context
) -> dict[str, Any]:
    """Create a function and its first version."""
    spec = build_version(body, principal.account, str(uuid.uuid4()), context.secret_box)
    state = VersionState(spec=spec)
    await context.registry.create(state)
    return {"function": version_json(state)}


@router.post(
    "/functions/{functionId}/versions", response_model=FunctionResponse, response_model_exclude_unset=True
)
async def create_version(
    function_id: FunctionId, body: CreateFunctionRequest, principal: Registrar, context: Context
) -> dict[str, Any]:
    """Create a new version of an existing function."""
    existing = await context.registry.function_versions(principal.account, function_id)
    if not existing:
        raise not_found(function_id, None, principal.account)
    if any(v.get("functionType", "DEFAULT") != body.functionType for v in existing):
        raise ProblemError(400, "All versions of a function must have the same functionType")
    spec = build_version(body, principal.account, function_id, context.secret_box)
    state = VersionState(spec=spec)
    await context.registry.create(state)
    return {"function": version_json(state)}


@router.get("/functions", response_model=None, responses={200: {"model": FunctionListResponse}})
async def list_functions(principal: Lister, context: Context, visibility: Visibility = None) -> Response:
    """List every function version of the account."""
    if not _only_private(visibility):
        return Response(b'{"functions":[]}', media_type="application/json")
    body = await context.registry.list_summaries_json(principal.account)
    return Response(b'{"functions":' + body + b"}", media_type="application/json")


@router.get("/functions/ids", response_model=FunctionIdsResponse, response_model_exclude_unset=True)
async def list_function_ids(
    principal: Lister, context: Context, visibility: Visibility = None
) -> dict[str, Any]:
    """List the ids of the account's functions."""
    if not _only_private(visibility):
        return {"functionIds": []}
    summaries = await context.registry.list_summaries(principal.account)
    return {"functionIds": list(dict.fromkeys(s["id"] for s in summaries))}


@router.get(
    "/functions/{functionId}/versions",
    response_model=FunctionListResponse,
    response_model_exclude_unset=True,
)
async def list_versions(function_id: FunctionId, principal: Lister, context: Context) -> dict[str, Any]:
    """List the versions of one function."""
    versions = await context.registry.function_versions(principal.account, function_id)
    if not versions:
        raise not_found(function_id, None, principal.account)
    return {"functions": versions}


@router.get(
    "/functions/{functionId}/versions/{versionId}",
    response_model=FunctionResponse,
    response_model_exclude_unset=True,
)
async def get_version(
    function_id: FunctionId,
    version_id: VersionId,
    principal: Lister,
    context: Context,
    includeSecrets: bool = True,
) -> dict[str, Any]:
    """Return one version, with its active instances."""
    state = await context.registry.describe(principal.account, function_id, version_id)
    return {"function": version_json(state, include_secrets=includeSecrets)}


@router.put(
    "/metadata/functions/{functionId}/versions/{versionId}",
    response_model=FunctionResponse,
    response_model_exclude_unset=True,
)
async def update_metadata(
    function_id: FunctionId,
    version_id: VersionId,
    body: UpdateMetadataRequest,
    principal: Updater,
    context: Context,
) -> dict[str, Any]:
    """Replace a version's tags."""
    state = await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_tags,
        UpdateTagsRequest(tags=body.tags),
    )
    return {"function": version_json(state)}


@router.put(
    "/functions/{functionId}/versions/{versionId}",
    response_model=FunctionResponse,
    response_model_exclude_unset=True,
)
async def update_version(
    function_id: FunctionId,
    version_id: VersionId,
    body: UpdateFunctionRequest,
    principal: Updater,
    context: Context,
) -> dict[str, Any]:
    """Replace a version's tags and/or rate limit (NVCF's newer metadata update); omitted fields are kept."""
    state = await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_tags,
        UpdateTagsRequest(
            tags=body.tags, rateLimit=body.rateLimit.model_dump(exclude_none=True) if body.rateLimit else None
        ),
    )
    return {"function": version_json(state)}


@router.put("/secrets/functions/{functionId}/versions/{versionId}", status_code=204)
async def update_secrets(
    function_id: FunctionId,
    version_id: VersionId,
    body: UpdateSecretsRequest,
    principal: SecretsUpdater,
    context: Context,
) -> Response:
    """Merge secrets into a version's (a name given again gets the new value); values are sealed here.

    Instances started from now on get the new values (on Kubernetes, the version's Secret is updated
    when its pods are next scaled); running instances keep theirs.
    """
    await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_secrets,
        WorkflowSecretsUpdate(
            encryptedSecrets={
                s.name: context.secret_box.seal(s.text, secret_context(version_id, s.name))
                for s in body.secrets
            }
        ),
    )
    return Response(status_code=204)


@router.put(
    "/ratelimit/functions/{functionId}/versions/{versionId}",
    response_model=FunctionResponse,
    response_model_exclude_unset=True,
)
async def set_rate_limit(
    function_id: FunctionId,
    version_id: VersionId,
    body: RateLimitRequest,
    principal: Updater,
    context: Context,
) -> dict[str, Any]:
    """Set a version's invocation rate limit (the gateways enforce it within a second)."""
    state = await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_tags,
        UpdateTagsRequest(tags=None, rateLimit=body.model_dump(exclude_none=True)),
    )
    return {"function": version_json(state)}


@router.delete("/ratelimit/functions/{functionId}/versions/{versionId}", status_code=204)
async def clear_rate_limit(
    function_id: FunctionId, version_id: VersionId, principal: Updater, context: Context
) -> Response:
    """Remove a version's invocation rate limit."""
    await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_tags,
        UpdateTagsRequest(tags=None, rateLimit={}),
    )
    return Response(status_code=204)


@router.delete("/functions/{functionId}/versions/{versionId}", status_code=204)
async def delete_version(
    function_id: FunctionId, version_id: VersionId, principal: Deleter, context: Context
) -> Response:
    """Delete a version, force-undeploying it first."""
    state = await context.registry.update(
        principal.account, function_id, version_id, FunctionVersionWorkflow.delete, DeleteRequest()
    )
    await context.gateway.withdraw_route(version_id)
    assert state.status == FunctionStatus.DELETED
    return Response(status_code=204)
