"""FastAPI dependencies: the app's shared objects, authentication with scopes, path parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Path, Request
from temporalio.client import Client

from api.auth import KeyCache
from api.gateway import Gateway
from api.principal import Principal
from api.problems import ProblemError
from api.registry import FunctionRegistry
from api.route_sync import RouteSync
from api.schemas import MAX_ACCOUNT_LENGTH, NAME_PATTERN
from gpufn.cluster_groups import ClusterGroups
from gpufn.sealing import SecretBox
from gpufn.settings import Settings

MAX_MANAGEMENT_BODY = 1024 * 1024


@dataclass
class AppContext:
    """What the API's lifespan builds once and every request uses."""

    settings: Settings
    client: Client
    keys: KeyCache
    registry: FunctionRegistry
    secret_box: SecretBox
    cluster_groups: ClusterGroups
    gateway: Gateway
    route_sync: RouteSync


def get_context(request: Request) -> AppContext:
    """Return the app's shared objects."""
    context: AppContext = request.app.state.context
    return context


Context = Annotated[AppContext, Depends(get_context)]

# Path parameters under NVCF's names (the OpenAPI document shows these).
FunctionId = Annotated[str, Path(alias="functionId", description="The function's id")]
VersionId = Annotated[str, Path(alias="versionId", description="The function version's id")]
DeploymentId = Annotated[str, Path(alias="deploymentId", description="The deployment's id")]
GpuSpecificationId = Annotated[
    str, Path(alias="gpuSpecificationId", description="The id of one GPU specification of the deployment")
]
KeyId = Annotated[str, Path(alias="keyId", description="The API key's id")]


def require(*scopes: str) -> Callable[..., Awaitable[Principal]]:
    """Return a dependency that authenticates the caller and checks that the key carries one of `scopes`."""

    async def dependency(request: Request, context: Context) -> Principal:
        principal = await context.keys.authenticate_fresh(request.headers.get("authorization"))
        if principal is None:
            raise ProblemError(
                401, "Unauthorized access: a valid API key is required (Authorization: Bearer <key>)"
            )
        if not any(principal.allows(scope) for scope in scopes):
            wanted = " or ".join(f"'{scope}'" for scope in scopes)
            raise ProblemError(403, f"Forbidden: the API key lacks the {wanted} scope")
        org = request.path_params.get("org")
        if org is None or org == principal.account:
            return principal
        # The admin key crosses accounts, on management paths as on invocation paths: under
        # /v2/orgs/{org}/... it acts in that org's account. Any other key belongs to its own org only.
        if not principal.admin:
            raise ProblemError(403, f"Forbidden: the API key does not belong to org '{org}'")
        if not NAME_PATTERN.match(org) or len(org) > MAX_ACCOUNT_LENGTH:
            raise ProblemError(
                400, f"Invalid org name: it must be 1-{MAX_ACCOUNT_LENGTH} characters of [a-zA-Z0-9-_]"
            )
        return replace(principal, account=org)

    return dependency


def plain_path_ids(request: Request) -> None:
    """Answer 404 for a path id with control characters: no id has them, and they must not reach a query.

    The org is checked by `require`, which names the rule.
    """
    for name, value in request.path_params.items():
        if name != "org" and any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
            raise ProblemError(404, f"Not found: the {name} in the path is not an id")
