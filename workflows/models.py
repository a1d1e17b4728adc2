"""Data carried by the function-version workflow: its state, its updates and signals, its activities' I/O.

Field names of the models that appear on the wire (the version spec, deployment specifications,
health info) are NVCF's JSON names verbatim, so the API can return them unchanged.
Everything here is pure data: no I/O, safe to import inside the workflow sandbox.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from gpufn.autoscaling import AutoscalerSettings, AutoscalingConfiguration, ScalingDecision


class FunctionStatus(StrEnum):
    """NVCF's function-version states (reference section 4), plus DELETED while a version is torn down."""

    INACTIVE = "INACTIVE"
    DEPLOYING = "DEPLOYING"
    ACTIVE = "ACTIVE"
    DEGRADING = "DEGRADING"
    DEGRADED = "DEGRADED"
    ERROR = "ERROR"
    DELETED = "DELETED"


BUSY_STATUSES = frozenset(
    {FunctionStatus.ACTIVE, FunctionStatus.DEPLOYING, FunctionStatus.DEGRADING, FunctionStatus.DEGRADED}
)
INVOCABLE_STATUSES = frozenset({FunctionStatus.ACTIVE, FunctionStatus.DEGRADING})


class InstanceStatus(StrEnum):
    """Lifecycle of one instance, as NVCF names instance states."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    ERRORED = "ERRORED"
    TERMINATED = "TERMINATED"


class Health(BaseModel):
    """How an instance's health is checked (NVCF `health`)."""

    protocol: str = "HTTP"
    uri: str = "/v2/health/ready"
    port: int = 8000
    timeout: str = "PT10S"
    expectedStatusCode: int = 200


class EnvironmentEntry(BaseModel):
    """One `containerEnvironment` entry."""

    key: str
    value: str


class ArtifactRef(BaseModel):
    """A model or resource mounted into the instance."""

    name: str
    version: str | None = None
    uri: str | None = None


class FunctionVersionSpec(BaseModel):
    """An immutable function version, as registered (NVCF `Function` minus its runtime fields)."""

    id: str
    versionId: str
    ncaId: str
    name: str
    description: str
    inferenceUrl: str
    inferencePort: int | None = None
    health: Health
    healthUri: str
    containerImage: str | None = None
    containerArgs: str | None = None
    containerEnvironment: list[EnvironmentEntry] | None = None
    helmChart: str | None = None
    helmChartServiceName: str | None = None
    models: list[ArtifactRef] | None = None
    resources: list[ArtifactRef] | None = None
    apiBodyFormat: str = "CUSTOM"
    functionType: str = "DEFAULT"
    tags: list[str] = Field(default_factory=list)
    secretNames: list[str] = Field(default_factory=list)
    encryptedSecrets: dict[str, str] = Field(default_factory=dict)
    """Secret values sealed with the stack's secret key; plain values never enter workflow data."""
    rateLimit: dict[str, Any] | None = None
    telemetries: dict[str, Any] | None = None
    createdAt: datetime

    @property
    def serving_port(self) -> int:
        """Return the port the inference server listens on (NVCF's default is 8000)."""
        return self.inferencePort or 8000


class DeploymentSpecification(BaseModel):
    """One GPU specification of a deployment (NVCF `deploymentSpecifications[]`)."""

    gpu: str
    instanceType: str
    minInstances: int
    maxInstances: int
    maxRequestConcurrency: int = 1
    backend: str | None = None
    clusters: list[str] | None = None
    availabilityZones: list[str] | None = None
    regions: list[str] | None = None
    attributes: list[str] | None = None
    configuration: dict[str, Any] | None = None
    preferredOrder: int | None = None
    autoscalingConfiguration: AutoscalingConfiguration | None = None
    gpufnAutoscaler: AutoscalerSettings | None = None
    """gpufn's own autoscaler overrides (an extension; NVCF clients never send it)."""
    gpuSpecificationId: str | None = None
    clusterGroup: str = "local"
    """The cluster group that serves this spec, resolved by the API from backend/clusters/gpu."""


class HealthInfo(BaseModel):
    """A failure a user can read (NVCF `healthInfo[]` of the deployment response)."""

    gpu: str
    backend: str
    instanceType: str
    error: str
    sisRequestId: str | None = None


class InstanceRecord(BaseModel):
    """One running (or failed) instance of a version, as the backend observed it."""

    instanceId: str
    specIndex: int
    status: InstanceStatus
    address: str | None = None
    """Base URL the gateway sends requests to, e.g. http://127.0.3.7:8000."""
    error: str | None = None
    logTail: str | None = None
    createdAt: datetime | None = None
    updatedAt: datetime | None = None


class PrepareResult(BaseModel):
    """What the prepare step pinned (digest or chart version), for reproducible instances."""

    resolvedImage: str | None = None
    resolvedChart: str | None = None


class Deployment(BaseModel):
    """The deployment of a version: what the user asked for, and bookkeeping around it."""

    deploymentId: str
    specifications: list[DeploymentSpecification]
    createdAt: datetime
    lastUpdatedAt: datetime
    deployStartedAt: datetime
    draining: bool = False
    """A graceful undeploy is waiting for in-flight and queued requests to finish."""
    prepared: list[PrepareResult] | None = None
    """What the prepare step pinned for each spec; None until it ran."""
    deployTimeoutSeconds: float = 900.0
    """DEPLOYING turns into ERROR when minInstances are not serving after this long."""
    deployPausedSeconds: float = 0.0
    """Time while DEPLOYING during which the platform was stopped (worker or Temporal down); it does not
    count against `deployTimeoutSeconds` (`DEADLINE_DOWNTIME_PATCH` in `workflows/lifecycle_options.py`)."""
    removing: bool = False
    """A forced undeploy (or a delete) asked for the instances to go; the workflow is tearing them down."""

    def deploy_deadline(self) -> datetime:
        """Return when DEPLOYING turns into ERROR: the timeout after the start, plus platform downtime."""
        return self.deployStartedAt + timedelta(seconds=self.deployTimeoutSeconds + self.deployPausedSeconds)


class ScalingStatus(BaseModel):
    """Where the autoscaler stands: current and desired counts and why (shown to users)."""

    current: int = 0
    desired: int = 0
    manualInstances: int | None = None
    lastDecision: ScalingDecision | None = None
    decidedAt: datetime | None = None


class SpecFailures(BaseModel):
    """Consecutive instance failures of one deployment spec, driving heal backoff and healthInfo."""

    consecutive: int = 0
    total: int = 0
    lastError: str | None = None
    retryNotBefore: datetime | None = None


class VersionState(BaseModel):
    """Everything the function-version workflow knows; carried across continue-as-new."""

    spec: FunctionVersionSpec
    status: FunctionStatus = FunctionStatus.INACTIVE
    deployment: Deployment | None = None
    instances: list[InstanceRecord] = Field(default_factory=list)
    desiredPerSpec: list[int] = Field(default_factory=list)
    failures: list[SpecFailures] = Field(default_factory=list)
    healthInfo: list[HealthInfo] = Field(default_factory=list)
    scaling: ScalingStatus = Field(default_factory=ScalingStatus)
    drainingInstanceIds: list[str] = Field(default_factory=list)
    deleted: bool = False
    deleteRequested: bool = False
    """A delete was accepted; the workflow removes the deployment, then completes."""
    routesVersion: int = 0
    """Bumped whenever what the gateway needs changes (status, ready instances, concurrency)."""


class FunctionVersionInput(BaseModel):
    """Input of the function-version workflow: its whole state (fresh, or carried by continue-as-new)."""

    state: VersionState
    continueAsNewAfterEvents: int | None = None
    """Continue as new once the history is this long (tests use a small number; default: when suggested)."""


# --- Updates and signals ------------------------------------------------------------------------------


class DeployRequest(BaseModel):
    """Update `deploy`: create the deployment of an INACTIVE version."""

    deploymentId: str
    specifications: list[DeploymentSpecification]
    requestedAt: datetime
    deployTimeoutSeconds: float | None = None
    """How long the deployment may stay DEPLOYING (the API's `GPUFN_DEPLOY_TIMEOUT`); None: 900 s.

    It travels in the update, so it is recorded in the history and the workflow stays deterministic."""
    accountId: str | None = None
    """The caller's account. The validator refuses (`VersionNotFound`) a version that is not this account's
    or is deleted, so the API deploys in one round trip, without reading the version first. None (an
    older API, which read it first): not checked."""


class UpdateDeploymentRequest(BaseModel):
    """Update `update_deployment`: change min/max/maxRequestConcurrency/autoscaling of the one spec."""

    specifications: list[DeploymentSpecification]
    requestedAt: datetime


class UndeployRequest(BaseModel):
    """Update `undeploy`: tear down now, or (graceful) after in-flight and queued requests finish."""

    graceful: bool = False


class UpdateSecretsRequest(BaseModel):
    """Update `update_secrets`: merge sealed secrets into the version's (a name given again is replaced)."""

    encryptedSecrets: dict[str, str]
    """Secret name -> value sealed by the API; plain values never enter workflow data."""


class UpdateTagsRequest(BaseModel):
    """Update `update_tags`: replace the tags (NVCF: values completely override existing).

    `PUT /v2/nvcf/functions/{id}/versions/{vid}` (NVCF's newer form) may also replace the rate limit;
    a field left out (None) is kept.
    """

    tags: list[str] | None
    rateLimit: dict[str, Any] | None = None
    """The new rate limit; an empty object removes it (`DELETE /v2/nvcf/ratelimit/...`)."""


class DeleteRequest(BaseModel):
    """Update `delete`: force-undeploy and remove the version."""


class ManualInstancesSignal(BaseModel):
    """Signal `set_manual_instances`: pin the instance count (None clears the override)."""

    count: int | None = None


class DrainInstanceSignal(BaseModel):
    """Signal `drain_instance`: stop routing to one instance, let it finish, then replace it."""

    instanceId: str


class ReconcileSignal(BaseModel):
    """Signal `reconcile`: re-observe the instances and re-apply the desired state now."""


class VersionView(BaseModel):
    """Result of the `describe` query and of every update: the state plus derived fields."""

    state: VersionState


# --- Activity I/O -------------------------------------------------------------------------------------


class VersionRef(BaseModel):
    """Identifies a function version for a backend."""

    accountId: str
    functionId: str
    versionId: str


class PrepareInput(BaseModel):
    """Resolve and pull what a deployment runs (image digest, chart) before any instance exists."""

    ref: VersionRef
    spec: FunctionVersionSpec
    deploymentSpec: DeploymentSpecification


class EnsureInstancesInput(BaseModel):
    """Make the version have exactly `count` live instances for spec `specIndex` (idempotent)."""

    ref: VersionRef
    spec: FunctionVersionSpec
    deploymentSpec: DeploymentSpecification
    specIndex: int
    count: int
    remove: list[str] = Field(default_factory=list)
    """Instances to remove first (drained, failed), so the backend removes exactly these."""
    prepared: PrepareResult = Field(default_factory=PrepareResult)


class ObserveInput(BaseModel):
    """Observe the version's instances; with `waitForChange`, return only once they differ from `known`."""

    ref: VersionRef
    specs: list[DeploymentSpecification]
    known: list[InstanceRecord] = Field(default_factory=list)
    waitForChange: bool = False
    maxWaitSeconds: float = 3600.0


class ObservedInstances(BaseModel):
    """The version's instances as the backend sees them now."""

    instances: list[InstanceRecord]


class TeardownInput(BaseModel):
    """Remove every instance and object of the version (idempotent)."""

    ref: VersionRef
    specs: list[DeploymentSpecification]


class DrainInput(BaseModel):
    """Wait until the gateways hold no request for these instances (bounded by timeoutSeconds)."""

    ref: VersionRef
    instanceIds: list[str] = Field(default_factory=list)
    wholeVersion: bool = False
    """Wait for the version's queue and every in-flight request, for a graceful undeploy."""
    routesVersion: int = 0
    """The routing version that stops traffic to the instances; gateways must have applied it."""
    timeoutSeconds: float = 60.0
    stopWhenBusy: bool = False
    """Return (drained=False) as soon as a request is seen queued or in flight, instead of waiting for it:
    a graceful undeploy asks this first, to finish at once when there is nothing to drain."""


class DrainResult(BaseModel):
    """Whether the drain finished in time, and how many requests were still held when it stopped."""

    drained: bool
    remaining: int = 0


class WatchLoadInput(BaseModel):
    """Run the autoscaler on the gateways' load; return when the desired count differs from `current`.

    Only workflows started before the single version watcher (`WatchInput`) still run this watcher.
    """

    ref: VersionRef
    maxRequestConcurrency: int
    minInstances: int
    maxInstances: int
    current: int
    ready: int
    settings: AutoscalerSettings
    nvcf: AutoscalingConfiguration | None = None
    maxWaitSeconds: float = 3600.0


class WatchLoadResult(BaseModel):
    """The autoscaler's decision (or no change when the watch timed out)."""

    decision: ScalingDecision | None = None


class AutoscalingWatch(BaseModel):
    """What the version watcher needs to run the autoscaler: bounds, concurrency, policy, counts."""

    maxRequestConcurrency: int
    minInstances: int
    maxInstances: int
    current: int
    """The count the workflow is bringing the version to; the watcher returns when it wants another."""
    ready: int
    settings: AutoscalerSettings
    nvcf: AutoscalingConfiguration | None = None


class WatchInput(BaseModel):
    """Watch one deployed version until its instances or its wanted instance count change.

    Returns when the instances differ from `known`, or when the autoscaler (if `autoscaling` is set)
    wants a count other than `autoscaling.current`.
    """

    ref: VersionRef
    specs: list[DeploymentSpecification]
    known: list[InstanceRecord] = Field(default_factory=list)
    autoscaling: AutoscalingWatch | None = None
    maxWaitSeconds: float = 86400.0


class WatchResult(BaseModel):
    """What changed: the instances as they are now, or the autoscaler's decision (neither: timed out)."""

    instances: list[InstanceRecord] | None = None
    decision: ScalingDecision | None = None
