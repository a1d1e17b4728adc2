"""What a version publishes to visibility: its list entry and its routing entry, both kept in the memo.

The list endpoints read `summary` (one visibility call lists a thousand versions) and the gateways read
`route` (which instances serve, with what concurrency), so neither ever queries a workflow per item.
"""

from __future__ import annotations

from typing import Any

from gpufn.contracts import RouteEntry, RouteInstance, RouteSpec
from workflows.models import InstanceStatus, VersionState


def function_json(state: VersionState) -> dict[str, Any]:
    """Return the version as NVCF's `Function` object (secret names only, never values)."""
    spec = state.spec
    body: dict[str, Any] = {
        "id": spec.id,
        "versionId": spec.versionId,
        "ncaId": spec.ncaId,
        "name": spec.name,
        "status": state.status.value,
        "inferenceUrl": spec.inferenceUrl,
        "inferencePort": spec.inferencePort,
        "containerImage": spec.containerImage,
        "containerArgs": spec.containerArgs,
        "containerEnvironment": (
            [e.model_dump() for e in spec.containerEnvironment]
            if spec.containerEnvironment is not None
            else None
        ),
        "helmChart": spec.helmChart,
        "helmChartServiceName": spec.helmChartServiceName,
        "models": [m.model_dump(exclude_none=True) for m in spec.models] if spec.models is not None else None,
        "resources": (
            [r.model_dump(exclude_none=True) for r in spec.resources] if spec.resources is not None else None
        ),
        "apiBodyFormat": spec.apiBodyFormat,
        "functionType": spec.functionType,
        "description": spec.description,
        "tags": list(spec.tags),
        "health": spec.health.model_dump(),
        "healthUri": spec.healthUri,
        "secrets": list(spec.secretNames),
        "rateLimit": spec.rateLimit or None,
        "telemetries": spec.telemetries,
        "createdAt": spec.createdAt.isoformat().replace("+00:00", "Z"),
    }
    return {k: v for k, v in body.items() if v is not None}


def summary_memo(state: VersionState) -> dict[str, Any]:
    """Return what the list endpoints show for this version."""
    return function_json(state)


def route_memo(state: VersionState) -> dict[str, Any]:
    """Return what a gateway needs to route invocations of this version (a `RouteEntry`, as JSON)."""
    spec = state.spec
    deployment = state.deployment
    specs = deployment.specifications if deployment is not None else []
    draining = set(state.drainingInstanceIds)
    instances = [
        RouteInstance(id=i.instanceId, address=i.address or "", spec=i.specIndex)
        for i in state.instances
        if i.status == InstanceStatus.RUNNING and i.address and i.instanceId not in draining
    ]
    entry = RouteEntry(
        accountId=spec.ncaId,
        functionId=spec.id,
        versionId=spec.versionId,
        functionName=spec.name,
        status=state.status.value,
        # A deployment being drained or torn down takes no new requests.
        deployed=deployment is not None and not deployment.draining and not deployment.removing,
        inferenceUrl=spec.inferenceUrl,
        specs=[
            RouteSpec(
                gpu=s.gpu,
                instanceType=s.instanceType,
                backend=s.backend or s.clusterGroup,
                maxRequestConcurrency=s.maxRequestConcurrency,
            )
            for s in specs
        ],
        instances=instances,
        routesVersion=state.routesVersion,
        rateLimit=spec.rateLimit or None,
        deploymentId=deployment.deploymentId if deployment is not None else None,
        # What `GET /v2/nvcf/deployments` lists besides the fields above, so the list is one
        # visibility call rather than a query per version.
        deployment=_deployment_listing(state),
    )
    return entry.to_json()


def _deployment_listing(state: VersionState) -> dict[str, Any] | None:
    """Return the NVCF deployment fields that the route entry does not already carry."""
    deployment = state.deployment
    if deployment is None:
        return None
    listing: dict[str, Any] = {
        "deploymentSpecifications": [
            s.model_dump(mode="json", exclude_none=True, exclude={"clusterGroup"})
            for s in deployment.specifications
        ],
        "createdAt": deployment.createdAt.isoformat().replace("+00:00", "Z"),
        "lastUpdatedAt": deployment.lastUpdatedAt.isoformat().replace("+00:00", "Z"),
    }
    if state.healthInfo:
        listing["healthInfo"] = [h.model_dump(exclude_none=True) for h in state.healthInfo]
    return listing
