"""Deployment endpoints (NVCF reference section 3) and the cluster groups they choose from."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import ValidationError

from api.deps import (
    AppContext,
    Context,
    DeploymentId,
    FunctionId,
    GpuSpecificationId,
    VersionId,
    require,
)
from api.principal import Principal
from api.problems import ProblemError
from api.responses import (
    ClusterGroupsResponse,
    DeploymentListResponse,
    DeploymentResponse,
    FunctionResponse,
    GpuSpecificationResponse,
)
from api.routes.functions import version_json
from api.schemas import (
    FIXED_FIELDS,
    DeploymentRequest,
    DeploymentSpecificationRequest,
    GpuSpecificationPatchRequest,
    describe_validation_error,
)
from gpufn.cluster_groups import InvalidPlacementError
from workflows.function_version import FunctionVersionWorkflow
from workflows.models import (
    DeploymentSpecification,
    DeployRequest,
    FunctionVersionSpec,
    UndeployRequest,
    UpdateDeploymentRequest,
    VersionState,
)
from workflows.routes import route_memo

router = APIRouter(tags=["deployments"])

Deployer = Annotated[Principal, Depends(require("deploy_function"))]
ClusterLister = Annotated[Principal, Depends(require("list_cluster_groups"))]


def _timestamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def deployment_json(state: VersionState) -> dict[str, Any]:
    """Return NVCF's deployment response, plus gpufn's instances and scaling (why the count is what it is)."""
    deployment = state.deployment
    if deployment is None:
        raise ProblemError(
            404, f"Deployment for function '{state.spec.id}' version '{state.spec.versionId}' not found"
        )
    body: dict[str, Any] = {
        "functionId": state.spec.id,
        "functionVersionId": state.spec.versionId,
        "deploymentId": deployment.deploymentId,
        "functionName": state.spec.name,
        "ncaId": state.spec.ncaId,
        "functionStatus": state.status.value,
        "deploymentSpecifications": [
            s.model_dump(mode="json", exclude_none=True, exclude={"clusterGroup"})
            for s in deployment.specifications
        ],
        "createdAt": _timestamp(deployment.createdAt),
        "lastUpdatedAt": _timestamp(deployment.lastUpdatedAt),
        "instances": [i.model_dump(mode="json", exclude_none=True) for i in state.instances],
        "scaling": state.scaling.model_dump(mode="json", exclude_none=True),
    }
    if state.healthInfo:
        body["healthInfo"] = [h.model_dump(exclude_none=True) for h in state.healthInfo]
    return {"deployment": body}


def _specifications(
    request: DeploymentRequest,
    spec: FunctionVersionSpec | None,
    context: AppContext,
    existing: list[DeploymentSpecification],
) -> list[DeploymentSpecification]:
    """Validate the requested specs against the version and the cluster groups; return them resolved.

    Without the version (`spec` None: a deploy, whose workflow checks the rest) only the placement.
    """
    specs = []
    for index, item in enumerate(request.deploymentSpecifications):
        if spec is not None and item.configuration and not spec.helmChart:
            raise ProblemError(400, "configuration is only allowed for Helm-chart functions")
        try:
            group = context.cluster_groups.resolve(item.gpu, item.instanceType, item.backend, item.clusters)
        except InvalidPlacementError as err:
            raise ProblemError(400, str(err)) from err
        spec_id = existing[index].gpuSpecificationId if index < len(existing) else None
        specs.append(
            DeploymentSpecification(
                **item.model_dump(exclude_none=True),
                clusterGroup=group,
                gpuSpecificationId=spec_id or str(uuid.uuid4()),
            )
        )
    return specs


async def _publish_route(context: AppContext, state: VersionState) -> None:
    """Show every replica's gateway the change before it is answered (an undeploy takes effect at once)."""
    await context.gateway.publish_route(route_memo(state))


@router.post(
    "/deployments/functions/{functionId}/versions/{versionId}",
    response_model=DeploymentResponse,
    response_model_exclude_unset=True,
)
async def create_deployment(
    function_id: FunctionId,
    version_id: VersionId,
    body: DeploymentRequest,
    principal: Deployer,
    context: Context,
) -> dict[str, Any]:
    """Deploy a version: one round trip to Temporal (the `deploy` update checks the version itself)."""
    try:
        specs = _specifications(body, None, context, [])
    except ProblemError:
        # A version the account does not have is a 404 before any fault of the request, as when the
        # version was read first: only this failing path reads it, to answer the same.
        current = await context.registry.describe(principal.account, function_id, version_id)
        _specifications(body, current.spec, context, [])
        raise
    state = await context.registry.deploy(
        principal.account,
        function_id,
        version_id,
        DeployRequest(deploymentId=str(uuid.uuid4()), specifications=specs, requestedAt=datetime.now(UTC)),
    )
    await _publish_route(context, state)
    return deployment_json(state)


@router.get(
    "/deployments/functions/{functionId}/versions/{versionId}",
    response_model=DeploymentResponse,
    response_model_exclude_unset=True,
)
async def get_deployment(
    function_id: FunctionId, version_id: VersionId, principal: Deployer, context: Context
) -> dict[str, Any]:
    """Return a version's deployment, with healthInfo when instances fail."""
    state = await context.registry.describe(principal.account, function_id, version_id)
    return deployment_json(state)


@router.put(
    "/deployments/functions/{functionId}/versions/{versionId}",
    response_model=DeploymentResponse,
    response_model_exclude_unset=True,
)
async def update_deployment(
    function_id: FunctionId,
    version_id: VersionId,
    body: DeploymentRequest,
    principal: Deployer,
    context: Context,
) -> dict[str, Any]:
    """Change min/max instances, maxRequestConcurrency and autoscaling of a deployed version."""
    current = await context.registry.describe(principal.account, function_id, version_id)
    if current.deployment is None:
        raise ProblemError(
            400, f"Invalid status {current.status.value}: the function version is not deployed"
        )
    if len(body.deploymentSpecifications) > 1:
        raise ProblemError(
            400, "Updating several deployment specifications at once is not supported: use PATCH"
        )
    specs = _specifications(body, current.spec, context, current.deployment.specifications)
    state = await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.update_deployment,
        UpdateDeploymentRequest(specifications=specs, requestedAt=datetime.now(UTC)),
    )
    await _publish_route(context, state)
    return deployment_json(state)


async def _deployed_by_id(context: AppContext, account: str, deployment_id: str) -> VersionState:
    """Return the state of the account's version deployed as `deployment_id`, or 404."""
    function_id, version_id = await context.registry.find_deployment(account, deployment_id)
    state = await context.registry.describe(account, function_id, version_id)
    if state.deployment is None or state.deployment.deploymentId != deployment_id:
        raise ProblemError(404, f"Deployment '{deployment_id}' not found in account '{account}'")
    return state


@router.get(
    "/deployments/{deploymentId}", response_model=DeploymentResponse, response_model_exclude_unset=True
)
async def get_deployment_by_id(
    deployment_id: DeploymentId, principal: Deployer, context: Context
) -> dict[str, Any]:
    """Return a deployment by its ID (NVCF's OSS form of the deployment lookup)."""
    state = await _deployed_by_id(context, principal.account, deployment_id)
    return deployment_json(state)


@router.get("/deployments", response_model=DeploymentListResponse, response_model_exclude_unset=True)
async def list_deployments(principal: Deployer, context: Context) -> dict[str, Any]:
    """List the account's deployments (NVCF's fields of each, as `GET /deployments/{id}` shows them)."""
    listed = await context.registry.list_deployments(principal.account)
    for index, item in enumerate(listed):
        if "deploymentSpecifications" not in item:
            # A version whose memo predates the deployment entry (it republishes on its next change):
            # read it once.
            try:
                state = await context.registry.describe(
                    principal.account, item["functionId"], item["functionVersionId"]
                )
            except ProblemError:
                continue  # deleted meanwhile
            if state.deployment is not None:
                full = deployment_json(state)["deployment"]
                listed[index] = {k: v for k, v in full.items() if k not in ("instances", "scaling")}
    return {"deployments": [item for item in listed if "deploymentSpecifications" in item]}


@router.patch(
    "/deployments/{deploymentId}/gpu-specifications/{gpuSpecificationId}",
    response_model=GpuSpecificationResponse,
    response_model_exclude_unset=True,
)
async def update_gpu_specification(
    deployment_id: DeploymentId,
    gpu_specification_id: GpuSpecificationId,
    body: GpuSpecificationPatchRequest,
    principal: Deployer,
    context: Context,
) -> dict[str, Any]:
    """Change one GPU specification of a deployment: only the fields the body gives; answer the spec."""
    current = await _deployed_by_id(context, principal.account, deployment_id)
    assert current.deployment is not None
    existing = current.deployment.specifications
    index = next((i for i, s in enumerate(existing) if s.gpuSpecificationId == gpu_specification_id), None)
    if index is None:
        raise ProblemError(
            404, f"GPU specification '{gpu_specification_id}' not found in deployment '{deployment_id}'"
        )
    requested = DeploymentRequest(
        deploymentSpecifications=[
            _patched(body, spec) if i == index else _as_request(spec) for i, spec in enumerate(existing)
        ]
    )
    specs = _specifications(requested, current.spec, context, existing)
    state = await context.registry.update(
        principal.account,
        current.spec.id,
        current.spec.versionId,
        FunctionVersionWorkflow.update_deployment,
        UpdateDeploymentRequest(specifications=specs, requestedAt=datetime.now(UTC)),
    )
    await _publish_route(context, state)
    assert state.deployment is not None
    spec = next(s for s in state.deployment.specifications if s.gpuSpecificationId == gpu_specification_id)
    return {"gpuSpecification": spec.model_dump(mode="json", exclude_none=True, exclude={"clusterGroup"})}


def _as_request(spec: DeploymentSpecification) -> DeploymentSpecificationRequest:
    """Return a stored specification as the request that would make it."""
    return DeploymentSpecificationRequest.model_validate(
        spec.model_dump(exclude={"clusterGroup", "gpuSpecificationId"}, exclude_none=True)
    )


def _patched(
    body: GpuSpecificationPatchRequest, spec: DeploymentSpecification
) -> DeploymentSpecificationRequest:
    """Merge a partial PATCH body into a stored specification; 400 when the result breaks a rule."""
    for name in FIXED_FIELDS:
        given, stored = getattr(body, name), getattr(spec, name)
        if given is not None and given != stored:
            raise ProblemError(400, f"Invalid request: {name} of a GPU specification cannot be changed")
    merged = spec.model_dump(exclude={"clusterGroup", "gpuSpecificationId"}, exclude_none=True)
    merged.update(
        body.model_dump(exclude_none=True, include={"minInstances", "maxInstances", "maxRequestConcurrency"})
    )
    if body.autoscalingConfiguration is not None:
        merged["autoscalingConfiguration"] = body.autoscalingConfiguration.model_dump(exclude_none=True)
    if body.autoscalingConfigurationPolicy == "PLATFORM_CONFIGURATION":
        # An empty configuration, not an absent one: the workflow keeps a stored configuration that an
        # update leaves out, and an empty one means the platform's policy.
        merged["autoscalingConfiguration"] = {}
    if body.gpufnAutoscaler is not None:
        merged["gpufnAutoscaler"] = body.gpufnAutoscaler.model_dump()
    try:
        return DeploymentSpecificationRequest.model_validate(merged)
    except ValidationError as err:
        raise ProblemError(400, describe_validation_error(err)) from err


@router.delete(
    "/deployments/functions/{functionId}/versions/{versionId}",
    response_model=FunctionResponse,
    response_model_exclude_unset=True,
)
async def delete_deployment(
    function_id: FunctionId,
    version_id: VersionId,
    principal: Deployer,
    context: Context,
    graceful: bool = False,
) -> dict[str, Any]:
    """Undeploy a version: at once, or (graceful=true) after its queued and in-flight requests finish."""
    state = await context.registry.update(
        principal.account,
        function_id,
        version_id,
        FunctionVersionWorkflow.undeploy,
        UndeployRequest(graceful=graceful),
    )
    await _publish_route(context, state)
    return {"function": version_json(state)}


@router.get("/clusterGroups", response_model=ClusterGroupsResponse, response_model_exclude_unset=True)
async def list_cluster_groups(principal: ClusterLister, context: Context) -> dict[str, Any]:
    """List the cluster groups with their GPUs and instance types."""
    body: dict[str, Any] = context.cluster_groups.as_json()
    return body
