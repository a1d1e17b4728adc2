"""Response bodies of the management API as typed models: the routes answer through them, and the
OpenAPI document describes them, so what is documented is what is sent.

Fields the answers leave out when empty are optional here; unknown fields are allowed, since answers
carry gpufn's extensions next to NVCF's fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ResponseModel(BaseModel):
    """Base of every response body: extra fields pass through unchanged."""

    model_config = ConfigDict(extra="allow")


class Problem(ResponseModel):
    """RFC 9457 problem details (`application/problem+json`), the body of every error answer."""

    type: str = Field(examples=["urn:nv-boot:problem-details:bad-request"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    requestId: str | None = None


class Health(ResponseModel):
    """A function's health check."""

    protocol: str
    uri: str
    port: int
    timeout: str
    expectedStatusCode: int


class ActiveInstance(ResponseModel):
    """An instance serving a deployed version."""

    instanceId: str
    functionId: str
    functionVersionId: str
    instanceStatus: str


class Function(ResponseModel):
    """NVCF's Function object: one version of a function."""

    id: str
    versionId: str
    ncaId: str
    name: str
    status: str
    inferenceUrl: str
    inferencePort: int | None = None
    containerImage: str | None = None
    containerArgs: str | None = None
    containerEnvironment: list[dict[str, str]] | None = None
    helmChart: str | None = None
    helmChartServiceName: str | None = None
    models: list[dict[str, Any]] | None = None
    resources: list[dict[str, Any]] | None = None
    apiBodyFormat: str
    functionType: str
    description: str
    tags: list[str]
    health: Health
    healthUri: str
    secrets: list[str] | None = None
    rateLimit: dict[str, Any] | None = None
    telemetries: dict[str, Any] | None = None
    createdAt: str
    activeInstances: list[ActiveInstance] | None = None


class FunctionResponse(ResponseModel):
    """`{"function": Function}`."""

    function: Function


class FunctionListResponse(ResponseModel):
    """`{"functions": [Function]}`."""

    functions: list[Function]


class FunctionIdsResponse(ResponseModel):
    """`{"functionIds": [...]}`."""

    functionIds: list[str]


class GpuSpecification(ResponseModel):
    """One GPU specification of a deployment, as stored."""

    gpu: str
    instanceType: str
    minInstances: int
    maxInstances: int
    maxRequestConcurrency: int
    gpuSpecificationId: str | None = None
    backend: str | None = None
    clusters: list[str] | None = None
    autoscalingConfiguration: dict[str, Any] | None = None


class HealthInfo(ResponseModel):
    """Why instances of a deployment fail."""

    gpu: str
    backend: str
    instanceType: str
    error: str


class Deployment(ResponseModel):
    """NVCF's deployment object (GET by id adds gpufn's `instances` and `scaling`)."""

    functionId: str
    functionVersionId: str
    deploymentId: str
    functionName: str
    ncaId: str
    functionStatus: str
    deploymentSpecifications: list[GpuSpecification]
    createdAt: str
    lastUpdatedAt: str
    healthInfo: list[HealthInfo] | None = None
    instances: list[dict[str, Any]] | None = None
    scaling: dict[str, Any] | None = None


class DeploymentResponse(ResponseModel):
    """`{"deployment": Deployment}`."""

    deployment: Deployment


class DeploymentListResponse(ResponseModel):
    """`{"deployments": [Deployment]}`."""

    deployments: list[Deployment]


class GpuSpecificationResponse(ResponseModel):
    """`{"gpuSpecification": GpuSpecification}`, the answer of a PATCH."""

    gpuSpecification: GpuSpecification


class ClusterGroupsResponse(ResponseModel):
    """`{"clusterGroups": [...]}` with their GPUs and instance types."""

    clusterGroups: list[dict[str, Any]]


class ApiKey(ResponseModel):
    """An API key's record (never the key itself)."""

    keyId: str
    account: str
    scopes: list[str]
    description: str
    createdAt: str


class CreatedApiKey(ApiKey):
    """A new key: the only answer that holds the key."""

    key: str


class ApiKeyListResponse(ResponseModel):
    """`{"keys": [ApiKey]}`."""

    keys: list[ApiKey]


class CallerInfo(ResponseModel):
    """NGC's key introspection answer."""

    type: str
    keyId: str
    orgName: str
    ncaId: str
    scopes: list[str]


class StackHealth(ResponseModel):
    """`GET /health`: overall status and each check."""

    status: str
    checks: dict[str, str]


class LoadReport(ResponseModel):
    """The gateway's per-version load (internal, for the workers' autoscaler)."""
