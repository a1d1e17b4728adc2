"""Request bodies of the management API, with every NVCF validation rule (reference section 2.1, 3.2).

Unknown fields are ignored, as NVCF's Jackson mapper does; a wrong type, a broken rule or a malformed
body becomes a 400 problem whose detail names the field, the rejected value and the rule.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from api.principal import ALL_SCOPES
from gpufn.autoscaling import AutoscalerSettings, AutoscalingConfiguration, ScaleDownDetails, ScaleUpDetails
from gpufn.durations import parse_iso_duration
from workflows.models import ArtifactRef, EnvironmentEntry

NAME_PATTERN = re.compile(r"^[a-z0-9A-Z][a-z0-9A-Z\-_]*$")
TAG_PATTERN = re.compile(r"^[a-zA-Z0-9\-_:=]+$")
SECRET_NAME_PATTERN = re.compile(r"^[a-z0-9A-Z][a-z0-9A-Z_.\-]*$")
RATE_LIMIT_PATTERN = re.compile(r"^(?!.*-([SMHD]).*-\1)[1-9]\d*-[SMHD](,\s*[1-9]\d*-[SMHD])*$")
MAX_RATE_COUNT = 10**9
MAX_TAGS = 64
MAX_TAG_LENGTH = 128
MAX_DESCRIPTION = 256
MAX_SECRET_VALUE = 32768
MAX_ACCOUNT_LENGTH = 128
MAX_REQUEST_CONCURRENCY = 1024
"""NVCF's managed limit of concurrent requests per instance (its OSS build allows 16384)."""
MAX_INSTANCES = 1000
"""Upper bound of minInstances and maxInstances of one GPU specification."""
MAX_DEPLOYMENT_SPECIFICATIONS = 32
MAX_HEALTH_TIMEOUT_SECONDS = 3600.0
MAX_SCALE_UP_FACTOR = 100.0
MAX_SCALE_RATE = 1000.0
MAX_IDLE_SECONDS = 7 * 86400.0
MAX_DRAIN_SECONDS = 86400.0
MAX_ENVIRONMENT_ENTRIES = 256


def documented(**schema: Any) -> Any:
    """Return `json_schema_extra` that documents a limit a validator enforces (with NVCF's wording).

    The validator and the schema read the same constants, so the documented limit is the enforced one.
    """
    return schema


NAME_SCHEMA = documented(minLength=1, maxLength=128, pattern=NAME_PATTERN.pattern)
URL_PATH_SCHEMA = documented(pattern=r"^/\S*$")
DURATION_SCHEMA = documented(pattern=r"^P(\d+(\.\d+)?D)?(T(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?$")
RATE_SCHEMA = documented(pattern=RATE_LIMIT_PATTERN.pattern)
TAGS_SCHEMA = documented(
    maxItems=MAX_TAGS,
    items={"type": "string", "minLength": 1, "maxLength": MAX_TAG_LENGTH, "pattern": TAG_PATTERN.pattern},
)


def validate_tags(tags: list[str]) -> list[str]:
    """Check NVCF's tag rules and return the tags as a set (duplicates collapse, first order kept)."""
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not 1 <= len(tag) <= MAX_TAG_LENGTH or not TAG_PATTERN.match(tag):
            raise ValueError(f"tag '{tag}' must be 1-{MAX_TAG_LENGTH} characters of [a-zA-Z0-9-_:=]")
    return list(dict.fromkeys(tags))


class RequestModel(BaseModel):
    """Base of every request body: unknown fields ignored, strings not coerced from numbers."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)


def _no_control_characters(value: str) -> str:
    """Refuse NUL and other control characters, which no path, command line or name may hold."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


class HealthRequest(RequestModel):
    """`health`: all five fields are required when the object is given; no other field is allowed.

    Unlike the top level, an unknown field here is refused: a misspelt health field would otherwise
    silently leave the check at a default that the function may never answer.
    """

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["HTTP", "gRPC", "GRPC"]
    uri: str = Field(json_schema_extra=URL_PATH_SCHEMA)
    port: int = Field(gt=0, le=65535)
    timeout: str = Field(json_schema_extra=DURATION_SCHEMA)
    expectedStatusCode: int = Field(ge=100, le=599)

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be a URL path such as /health")
        return _no_control_characters(value)

    @field_validator("timeout")
    @classmethod
    def _iso_duration(cls, value: str) -> str:
        seconds = parse_iso_duration(value)
        if not 0 < seconds <= MAX_HEALTH_TIMEOUT_SECONDS:
            raise ValueError("must be a positive ISO-8601 duration of at most PT1H, such as PT10S")
        return value


class EnvironmentEntryRequest(RequestModel):
    """A `containerEnvironment` entry: a variable name a process environment can hold, and its value."""

    key: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=MAX_SECRET_VALUE)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        # What no process environment can hold; stricter rules (Kubernetes' names) are the backend's,
        # which reports them as the deployment's error.
        if "=" in value or "\x00" in value:
            raise ValueError("must not contain '=' or NUL characters")
        return value

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class ArtifactRequest(RequestModel):
    """A `models[]` or `resources[]` entry."""

    name: str = Field(min_length=1)
    version: str | None = None
    uri: str | None = None


class SecretRequest(RequestModel):
    """A secret: only its name is ever returned, and its value is never echoed, not even in an error."""

    name: str = Field(
        json_schema_extra=documented(minLength=1, maxLength=48, pattern=SECRET_NAME_PATTERN.pattern)
    )
    value: str | dict[str, Any] = Field(
        description=f"A string or a JSON object, 1-{MAX_SECRET_VALUE} characters (serialized); never returned"
    )

    @field_validator("name")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        if not 1 <= len(value) <= 48 or not SECRET_NAME_PATTERN.match(value):
            raise ValueError("must be 1-48 characters matching ^[a-z0-9A-Z][a-z0-9A-Z_.\\-]*$")
        return value

    @field_validator("value", mode="before")
    @classmethod
    def _secret_value(cls, value: Any) -> Any:
        if not isinstance(value, str | dict):
            raise ValueError("must be a string or a JSON object")
        text = value if isinstance(value, str) else json.dumps(value)
        if not 1 <= len(text) <= MAX_SECRET_VALUE:
            raise ValueError(f"must be 1-{MAX_SECRET_VALUE} characters")
        return value

    @property
    def text(self) -> str:
        """Return the value as stored: JSON objects serialized."""
        return self.value if isinstance(self.value, str) else json.dumps(self.value)


class UpdateSecretsRequest(RequestModel):
    """Body of `PUT /v2/nvcf/secrets/functions/{id}/versions/{vid}`: secrets merged into the version's."""

    secrets: list[SecretRequest] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> UpdateSecretsRequest:
        if len({s.name for s in self.secrets}) != len(self.secrets):
            raise ValueError("Invalid request: duplicate secret names")
        return self


class TelemetriesRequest(RequestModel):
    """`telemetries`: at least one id."""

    logsTelemetryId: str | None = None
    metricsTelemetryId: str | None = None
    tracesTelemetryId: str | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> TelemetriesRequest:
        if not (self.logsTelemetryId or self.metricsTelemetryId or self.tracesTelemetryId):
            raise ValueError(
                "telemetries needs at least one of logsTelemetryId, metricsTelemetryId, tracesTelemetryId"
            )
        return self


def _valid_rate(value: str) -> bool:
    """Return whether a rate is NVCF's `count-unit[,count-unit...]` with counts the gateway can hold."""
    if not RATE_LIMIT_PATTERN.match(value):
        return False
    return all(len(count) <= 10 and int(count) <= MAX_RATE_COUNT for count in re.findall(r"(\d+)-", value))


class RateLimitRequest(RequestModel):
    """`rateLimit`, e.g. {"rateLimit": "100-S"}."""

    rateLimit: str = Field(json_schema_extra=RATE_SCHEMA)
    exemptedNcaIds: list[str] | None = Field(default=None, max_length=32)
    perNcaIdRate: dict[str, str] | None = None
    perUserRate: str | None = Field(default=None, json_schema_extra=RATE_SCHEMA)
    syncCheck: bool = False

    @field_validator("rateLimit", "perUserRate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not _valid_rate(value):
            raise ValueError(
                "must look like 100-S or 10-S,500-M (count-unit, units S M H D, each once, "
                f"counts up to {MAX_RATE_COUNT})"
            )
        return value

    @field_validator("perNcaIdRate")
    @classmethod
    def _rates(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 32:
            raise ValueError("at most 32 accounts may have their own rate")
        for account, rate in value.items():
            if not _valid_rate(rate):
                raise ValueError(f"the rate of '{account}' must look like 100-S or 10-S,500-M")
        return value


class CreateFunctionRequest(RequestModel):
    """Body of `POST /v2/nvcf/functions` and `POST /v2/nvcf/functions/{id}/versions`."""

    name: str = Field(json_schema_extra=NAME_SCHEMA)
    inferenceUrl: str = Field(json_schema_extra=URL_PATH_SCHEMA)
    inferencePort: int | None = Field(default=None, gt=0, le=65535)
    health: HealthRequest | None = None
    healthUri: str | None = Field(default=None, json_schema_extra=URL_PATH_SCHEMA)
    containerImage: str | None = None
    helmChart: str | None = None
    helmChartServiceName: str | None = None
    models: list[ArtifactRequest] | None = None
    resources: list[ArtifactRequest] | None = None
    containerArgs: str | None = Field(default=None, max_length=MAX_SECRET_VALUE)
    containerEnvironment: list[EnvironmentEntryRequest] | None = Field(
        default=None, max_length=MAX_ENVIRONMENT_ENTRIES
    )
    apiBodyFormat: Literal["PREDICT_V2", "CUSTOM"] = "CUSTOM"
    functionType: Literal["DEFAULT", "STREAMING"] = "DEFAULT"
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    tags: list[str] | None = Field(default=None, json_schema_extra=TAGS_SCHEMA)
    secrets: list[SecretRequest] | None = None
    rateLimit: RateLimitRequest | None = None
    telemetries: TelemetriesRequest | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not 1 <= len(value) <= 128:
            raise ValueError("must be 1-128 characters")
        if not NAME_PATTERN.match(value):
            raise ValueError("must match ^[a-z0-9A-Z][a-z0-9A-Z\\-_]*$")
        return value

    @field_validator("inferenceUrl", "healthUri")
    @classmethod
    def _url_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip() or not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must be a URL path such as /echo")
        return _no_control_characters(value)

    @field_validator("containerImage", "helmChart", "helmChartServiceName")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError("must not be blank or contain whitespace")
        return value if value is None else _no_control_characters(value)

    @field_validator("containerArgs")
    @classmethod
    def _command_line(cls, value: str | None) -> str | None:
        """Refuse a command line that cannot be split into arguments, as the backends split it."""
        if value is None:
            return None
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            shlex.split(value)
        except ValueError as err:
            raise ValueError(f"cannot be split as a command line ({err})") from err
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else validate_tags(value)

    @model_validator(mode="after")
    def _cross_field(self) -> CreateFunctionRequest:
        if not (self.containerImage or self.helmChart or self.models):
            raise ValueError("Invalid request: one of containerImage, helmChart or models is required")
        if self.containerImage and self.helmChart:
            raise ValueError("Invalid request: containerImage and helmChart are mutually exclusive")
        if bool(self.helmChart) != bool(self.helmChartServiceName):
            raise ValueError("Invalid request: helmChart and helmChartServiceName must be given together")
        if self.helmChart and (self.containerArgs is not None or self.containerEnvironment is not None):
            raise ValueError(
                "Invalid request: containerArgs and containerEnvironment are not allowed with helmChart"
            )
        if self.models:
            names = [m.name for m in self.models]
            if len(set(names)) != len(names):
                raise ValueError("Invalid request: model names must be unique")
            for model in self.models:
                if not model.version or not model.uri:
                    raise ValueError(f"Invalid request: model '{model.name}' needs version and uri")
        for resource in self.resources or []:
            if not resource.version or not resource.uri:
                raise ValueError(f"Invalid request: resource '{resource.name}' needs name, version and uri")
        if self.secrets:
            names = [s.name for s in self.secrets]
            if len(set(names)) != len(names):
                raise ValueError("Invalid request: duplicate secret names")
        return self

    def environment(self) -> list[EnvironmentEntry] | None:
        """Return `containerEnvironment` in its stored form."""
        if self.containerEnvironment is None:
            return None
        return [EnvironmentEntry(key=e.key, value=e.value) for e in self.containerEnvironment]

    def artifacts(self, items: list[ArtifactRequest] | None) -> list[ArtifactRef] | None:
        """Convert model/resource entries to their stored form."""
        if items is None:
            return None
        return [ArtifactRef(name=i.name, version=i.version, uri=i.uri) for i in items]


class UpdateMetadataRequest(RequestModel):
    """Body of `PUT /v2/nvcf/metadata/functions/{id}/versions/{vid}`: the new tags, replacing the old."""

    tags: list[str] = Field(json_schema_extra=TAGS_SCHEMA)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        return validate_tags(value)


class UpdateFunctionRequest(RequestModel):
    """Body of `PUT /v2/nvcf/functions/{id}/versions/{vid}`: any of tags and rateLimit, others kept."""

    tags: list[str] | None = Field(default=None, json_schema_extra=TAGS_SCHEMA)
    rateLimit: RateLimitRequest | None = None

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else validate_tags(value)

    @model_validator(mode="after")
    def _at_least_one(self) -> UpdateFunctionRequest:
        if self.tags is None and self.rateLimit is None:
            raise ValueError("Invalid request: give at least one of tags or rateLimit")
        return self


class ScaleUpDetailsRequest(ScaleUpDetails):
    """`scaleUpDetails` as a request may give it: the stored rules, with an upper bound on `factor`."""

    factor: float = Field(gt=1.0, le=MAX_SCALE_UP_FACTOR)


class ScaleDownDetailsRequest(ScaleDownDetails):
    """`scaleDownDetails` as a request may give it (every number is already bounded)."""


class AutoscalingConfigurationRequest(AutoscalingConfiguration):
    """NVCF's `autoscalingConfiguration` as a request may give it, every number bounded."""

    scaleUpDetails: ScaleUpDetailsRequest | None = None
    scaleDownDetails: ScaleDownDetailsRequest | None = None


class AutoscalerSettingsRequest(AutoscalerSettings):
    """gpufn's `gpufnAutoscaler` as a request may give it: the stored rules, with upper bounds added."""

    maxScaleUpRate: float = Field(1000.0, gt=1.0, le=MAX_SCALE_RATE)
    maxScaleDownRate: float = Field(2.0, gt=1.0, le=MAX_SCALE_RATE)
    scaleToZeroIdleSeconds: float = Field(300.0, ge=0.0, le=MAX_IDLE_SECONDS)
    drainTimeoutSeconds: float = Field(60.0, ge=0.0, le=MAX_DRAIN_SECONDS)


class DeploymentSpecificationRequest(RequestModel):
    """One GPU specification of a deployment request."""

    gpu: str = Field(min_length=1)
    instanceType: str = Field(min_length=1)
    minInstances: int = Field(ge=0, le=MAX_INSTANCES)
    maxInstances: int = Field(ge=1, le=MAX_INSTANCES)
    maxRequestConcurrency: int = Field(default=1, ge=1, le=MAX_REQUEST_CONCURRENCY)
    backend: str | None = None
    clusters: list[str] | None = None
    availabilityZones: list[str] | None = None
    regions: list[str] | None = None
    attributes: list[str] | None = None
    configuration: dict[str, Any] | None = None
    preferredOrder: int | None = Field(default=None, ge=1, le=99)
    autoscalingConfiguration: AutoscalingConfigurationRequest | None = None
    gpufnAutoscaler: AutoscalerSettingsRequest | None = None

    @model_validator(mode="after")
    def _rules(self) -> DeploymentSpecificationRequest:
        if self.minInstances > self.maxInstances:
            raise ValueError("minInstances must be less than or equal to maxInstances")
        if self.backend and self.clusters:
            raise ValueError("backend cannot be combined with clusters")
        return self


class GpuSpecificationPatchRequest(RequestModel):
    """Body of `PATCH /v2/nvcf/deployments/{id}/gpu-specifications/{specId}`: only the fields to change.

    `gpu`, `instanceType`, `backend` and `clusters` may be repeated (clients send the whole
    specification back) but not changed.
    """

    minInstances: int | None = Field(default=None, ge=0, le=MAX_INSTANCES)
    maxInstances: int | None = Field(default=None, ge=1, le=MAX_INSTANCES)
    maxRequestConcurrency: int | None = Field(default=None, ge=1, le=MAX_REQUEST_CONCURRENCY)
    autoscalingConfiguration: AutoscalingConfigurationRequest | None = None
    autoscalingConfigurationPolicy: Literal["CUSTOM_CONFIGURATION", "PLATFORM_CONFIGURATION"] | None = None
    gpufnAutoscaler: AutoscalerSettingsRequest | None = None
    gpu: str | None = None
    instanceType: str | None = None
    backend: str | None = None
    clusters: list[str] | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> GpuSpecificationPatchRequest:
        changes = self.model_dump(exclude_none=True, include=set(PATCHABLE_FIELDS))
        if not changes:
            raise ValueError(
                "Invalid request: give at least one of minInstances, maxInstances, maxRequestConcurrency, "
                "autoscalingConfiguration, autoscalingConfigurationPolicy, gpufnAutoscaler"
            )
        if self.autoscalingConfigurationPolicy == "PLATFORM_CONFIGURATION" and self.autoscalingConfiguration:
            raise ValueError(
                "Invalid request: autoscalingConfiguration cannot be combined with PLATFORM_CONFIGURATION"
            )
        return self


PATCHABLE_FIELDS = (
    "minInstances",
    "maxInstances",
    "maxRequestConcurrency",
    "autoscalingConfiguration",
    "autoscalingConfigurationPolicy",
    "gpufnAutoscaler",
)
FIXED_FIELDS = ("gpu", "instanceType", "backend", "clusters")


class DeploymentRequest(RequestModel):
    """Body of `POST|PUT /v2/nvcf/deployments/functions/{id}/versions/{vid}`."""

    deploymentSpecifications: list[DeploymentSpecificationRequest] = Field(
        min_length=1, max_length=MAX_DEPLOYMENT_SPECIFICATIONS
    )


class CreateKeyRequest(RequestModel):
    """Body of `POST /v2/gpufn/keys`."""

    account: str | None = Field(default=None, json_schema_extra=NAME_SCHEMA)
    """The key's account; only the admin may name another account than its own."""
    scopes: list[str] = Field(
        min_length=1, json_schema_extra=documented(items={"type": "string", "enum": sorted(ALL_SCOPES)})
    )
    description: str = Field(default="", max_length=256)

    @field_validator("account")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and (not 1 <= len(value) <= MAX_ACCOUNT_LENGTH or not NAME_PATTERN.match(value)):
            raise ValueError("must be 1-128 characters matching ^[a-z0-9A-Z][a-z0-9A-Z\\-_]*$")
        return value


def describe_validation_error(error: ValidationError) -> str:
    """Turn a pydantic error into NVCF's "Validation failed: [...]" detail, one entry per problem."""
    return describe_errors(error.errors(include_url=False))


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """Return the "Validation failed: [...]" detail of pydantic's error items (FastAPI's too).

    A request body's errors are named by their field alone (FastAPI's `body.` prefix dropped), as NVCF
    names them.
    """
    parts = []
    for item in errors:
        loc = tuple(item["loc"])
        if loc[:1] == ("body",):
            loc = loc[1:]
        field = ".".join(str(p) for p in loc) or "body"
        message = item["msg"].removeprefix("Value error, ")
        rejected = item.get("input")
        if _is_secret_value(loc):
            rejected_text = "[hidden]"
        elif isinstance(rejected, dict):
            rejected_text = "{...}"
        else:
            rejected_text = json.dumps(rejected, default=str)
        if len(rejected_text) > 80:
            rejected_text = rejected_text[:77] + "..."
        parts.append(f"[field={field}, rejected={rejected_text}, message={message}]")
    return "Validation failed: " + ", ".join(parts)


def _is_secret_value(loc: tuple[int | str, ...]) -> bool:
    """Return whether an error's input may hold a secret value: anything under `secrets` but a name."""
    return "secrets" in loc and loc[-1] != "name"
