"""API keys: gpufn's key management (admin) and NGC's key introspection."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response

from api.auth import bearer
from api.deps import Context, parse_body, require
from api.principal import ALL_SCOPES, Principal
from api.problems import ProblemError
from api.schemas import CreateKeyRequest
from workflows.key_registry import ApiKeyRecord

router = APIRouter(tags=["keys"])

KeyManager = Annotated[Principal, Depends(require("manage_keys"))]


def _key_json(record: ApiKeyRecord) -> dict[str, Any]:
    return {
        "keyId": record.keyId,
        "account": record.account,
        "scopes": record.scopes,
        "description": record.description,
        "createdAt": record.createdAt.isoformat().replace("+00:00", "Z"),
    }


@router.post("/v2/gpufn/keys", status_code=201)
async def create_key(request: Request, principal: KeyManager, context: Context) -> dict[str, Any]:
    """Create an API key; the key itself is in this answer only."""
    body = await parse_body(request, CreateKeyRequest)
    account = body.account or principal.account
    if account != principal.account and not principal.admin:
        raise ProblemError(403, "Only the admin key can create keys for another account")
    unknown = sorted(set(body.scopes) - ALL_SCOPES)
    if unknown:
        raise ProblemError(400, f"Unknown scopes {unknown}; known scopes: {sorted(ALL_SCOPES)}")
    if "manage_keys" in body.scopes and not principal.admin:
        raise ProblemError(403, "Only the admin key can grant manage_keys")
    key, record = await context.keys.create(account, body.scopes, body.description)
    return {"key": key, **_key_json(record)}


@router.get("/v2/gpufn/keys")
async def list_keys(principal: KeyManager, context: Context) -> dict[str, Any]:
    """List keys (all accounts for the admin, else the caller's account), never the keys themselves."""
    records = [r for r in context.keys.records if principal.admin or r.account == principal.account]
    return {"keys": [_key_json(r) for r in records]}


@router.delete("/v2/gpufn/keys/{key_id}", status_code=204)
async def revoke_key(key_id: str, principal: KeyManager, context: Context) -> Response:
    """Revoke a key."""
    record = next((r for r in context.keys.records if r.keyId == key_id), None)
    if record is None or (record.account != principal.account and not principal.admin):
        raise ProblemError(404, f"Key '{key_id}' not found")
    await context.keys.revoke(key_id)
    return Response(status_code=204)


@router.post("/v3/keys/get-caller-info")
async def get_caller_info(request: Request, context: Context) -> dict[str, Any]:
    """NGC's key introspection: form field `credentials` (or the bearer key) → account and key type."""
    form = await request.form()
    credentials = form.get("credentials")
    key = (
        credentials
        if isinstance(credentials, str) and credentials
        else bearer(request.headers.get("authorization"))
    )
    if not key:
        raise ProblemError(400, "The form field 'credentials' is required")
    principal = await context.keys.authenticate_fresh(f"Bearer {key}")
    if principal is None:
        raise ProblemError(401, "Unauthorized access: unknown or revoked API key")
    return {
        "type": "PERSONAL_KEY" if not principal.admin else "SERVICE_KEY",
        "keyId": principal.key_id,
        "orgName": principal.account,
        "ncaId": principal.account,
        "scopes": sorted(principal.scopes),
        "user": {"name": principal.account},
        "roles": [{"org": {"name": principal.account}, "orgRoles": sorted(principal.scopes)}],
    }
