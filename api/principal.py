"""Who is calling: the account and scopes an API key carries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ALL_SCOPES = frozenset(
    {
        "register_function",
        "list_functions",
        "list_functions_details",
        "update_function",
        "delete_function",
        "deploy_function",
        "invoke_function",
        "queue_details",
        "list_cluster_groups",
        "authorize_clients",
        "update_secrets",
        "manage_keys",
    }
)
"""The scopes a key may carry: NVCF's, plus gpufn's `manage_keys` (create and revoke keys)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    account: str
    """The account (NVCF's ncaId) the key belongs to; also the org name of /v2/orgs/{org}/... paths."""
    key_id: str
    scopes: frozenset[str]
    admin: bool = False

    def allows(self, scope: str) -> bool:
        """Return whether the key carries `scope` (admin keys carry every scope)."""
        return self.admin or scope in self.scopes


Authenticate = Callable[[str | None], Principal | None]
"""Turns an `Authorization` header value into a principal, or None when the key is missing or unknown.

Synchronous and in-memory: it runs on every request, including every invocation.
"""
