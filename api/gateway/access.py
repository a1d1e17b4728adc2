"""Who may call the gateway for what: the caller's key and scopes, the version an invocation goes to.

Every check raises `_Refused` (the gateway answers it as problem details): 401 without a valid key, 403
for a missing scope or another organization, 404/400 for a version the caller cannot invoke.
"""

from __future__ import annotations

import random
from collections.abc import MutableMapping
from typing import Any

from api.gateway.asgi import _headers, _Refused, _small_int
from api.gateway.routes import RouteTable, VersionRoute
from api.gateway.settings import GatewaySettings
from api.principal import Authenticate, Principal

INVOKE_SCOPE = "invoke_function"
QUEUE_SCOPE = "queue_details"


class Access:
    """Authenticates callers and resolves what they invoke.

    Args:
        authenticate: Turns an Authorization header into a principal; called on every request.
        routes: The routing table versions are looked up in.
        settings: Poll-window limits.
    """

    def __init__(self, authenticate: Authenticate, routes: RouteTable, settings: GatewaySettings) -> None:
        self._authenticate = authenticate
        self._routes = routes
        self._settings = settings

    def principal(self, authorization: bytes | None, scope_name: str, org: str | None) -> Principal:
        """Return the caller of a key that carries `scope_name` and belongs to `org` (when given)."""
        principal = self._authenticate(authorization.decode("latin-1") if authorization is not None else None)
        if principal is None:
            detail = (
                "Header of type `authorization` was missing"
                if authorization is None
                else "Unauthorized access"
            )
            raise _Refused(401, detail, [(b"www-authenticate", b"Bearer")])
        if not principal.allows(scope_name):
            raise _Refused(403, f"The key does not carry the '{scope_name}' scope")
        if org is not None and org != principal.account and not principal.admin:
            raise _Refused(403, f"The key does not belong to organization '{org}'")
        return principal

    def require_admin(self, scope: MutableMapping[str, Any], refusal: str) -> None:
        """Refuse the request (401, or 403 with `refusal`) unless it carries an admin key."""
        authorization = _headers(scope).get(b"authorization")
        principal = self._authenticate(authorization.decode("latin-1") if authorization is not None else None)
        if principal is None:
            raise _Refused(401, "Unauthorized access", [(b"www-authenticate", b"Bearer")])
        if not principal.admin:
            raise _Refused(403, refusal)

    def poll_seconds(self, raw: bytes | None) -> int:
        """Return the NVCF-POLL-SECONDS header's value, or the default when it is absent."""
        if raw is None:
            return self._settings.default_poll_seconds
        value = _small_int(raw.strip())
        if value is None or value > self._settings.max_poll_seconds:
            raise _Refused(
                400,
                "NVCF-POLL-SECONDS must be a whole number of seconds "
                f"from 0 to {self._settings.max_poll_seconds}",
            )
        return value

    @staticmethod
    def visible(version: VersionRoute, principal: Principal) -> bool:
        """Return whether the caller may see the version (its own account's, or any for an admin)."""
        return principal.admin or version.account_id == principal.account

    def select(self, principal: Principal, function_id: str, version_id: str | None) -> VersionRoute:
        """Return the version to invoke: the pinned one, or a random invocable one of the function."""
        if version_id is None:
            siblings = self._routes.function_versions(function_id)
            if len(siblings) == 1:
                # The common case: one version, visible and invocable.
                only = siblings[0]
                if only.invocable and (only.account_id == principal.account or principal.admin):
                    return only
            candidates = [v for v in siblings if self.visible(v, principal)]
            invocable = [v for v in candidates if v.invocable]
            if len(invocable) == 1:
                return invocable[0]
            if invocable:
                return random.choice(invocable)
            if any(v.degraded for v in candidates):
                raise _Refused(400, f"Function id '{function_id}': DEGRADED function cannot be invoked")
            raise _Refused(
                404,
                f"Function id '{function_id}': Specified function in account "
                f"'{principal.account}' is not found",
            )
        version = self._routes.get(version_id)
        if version is None or version.function_id != function_id or not self.visible(version, principal):
            raise _Refused(
                404,
                f"Function id '{function_id}' version '{version_id}': Specified function in account "
                f"'{principal.account}' is not found",
            )
        if not version.invocable:
            if version.degraded:
                raise _Refused(
                    400,
                    f"Function id '{function_id}' version '{version_id}': "
                    "DEGRADED function cannot be invoked",
                )
            raise _Refused(
                404,
                f"Function id '{function_id}' version '{version_id}': Specified function in account "
                f"'{principal.account}' is not found (status {version.status})",
            )
        return version
