"""API keys: gpufn's key management (admin) and NGC's key introspection."""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from temporalio.client import WorkflowUpdateFailedError

from api.auth import bearer
from api.deps import Context, KeyId, require
from api.principal import ALL_SCOPES, Principal
from api.problems import ProblemError
from api.responses import ApiKeyListResponse, CallerInfo, CreatedApiKey
from api.schemas import CreateKeyRequest
from workflows.key_registry import ApiKeyRecord

router = APIRouter(tags=["keys"])

MAX_CALLER_INFO_BODY = 64 * 1024

KeyManager = Annotated[Principal, Depends(require("manage_keys"))]


def _key_json(record: ApiKeyRecord) -> dict[str, Any]:
    return {
        "keyId": record.keyId,
        "account": record.account,
        "scopes": record.scopes,
        "description": record.description,
        "createdAt": record.createdAt.isoformat().replace("+00:00", "Z"),
    }


@router.post(
    "/v2/gpufn/keys", status_code=201, response_model=CreatedApiKey, response_model_exclude_unset=True
)
async def create_key(body: CreateKeyRequest, principal: KeyManager, context: Context) -> dict[str, Any]:
    """Create an API key; the key itself is in this answer only."""
    account = body.account or principal.account
    if account != principal.account and not principal.admin:
        raise ProblemError(403, "Only the admin key can create keys for another account")
    unknown = sorted(set(body.scopes) - ALL_SCOPES)
    if unknown:
        raise ProblemError(400, f"Unknown scopes {unknown}; known scopes: {sorted(ALL_SCOPES)}")
    if "manage_keys" in body.scopes and not principal.admin:
        raise ProblemError(403, "Only the admin key can grant manage_keys")
    # A key cannot grant more than it holds: otherwise a key with only manage_keys could mint a key
    # that deploys and invokes.
    beyond = sorted(scope for scope in set(body.scopes) if not principal.allows(scope))
    if beyond:
        raise ProblemError(403, f"A key can grant only scopes it holds itself; this key lacks {beyond}")
    key, record = await context.keys.create(account, body.scopes, body.description)
    return {"key": key, **_key_json(record)}


@router.get("/v2/gpufn/keys", response_model=ApiKeyListResponse, response_model_exclude_unset=True)
async def list_keys(principal: KeyManager, context: Context) -> dict[str, Any]:
    """List keys (all accounts for the admin, else the caller's account), never the keys themselves."""
    records = [r for r in context.keys.records if principal.admin or r.account == principal.account]
    return {"keys": [_key_json(r) for r in records]}


@router.delete("/v2/gpufn/keys/{keyId}", status_code=204)
async def revoke_key(key_id: KeyId, principal: KeyManager, context: Context) -> Response:
    """Revoke a key."""
    record = next((r for r in context.keys.records if r.keyId == key_id), None)
    if record is None or (record.account != principal.account and not principal.admin):
        raise ProblemError(404, f"Key '{key_id}' not found")
    try:
        await context.keys.revoke(key_id)
    except WorkflowUpdateFailedError as err:  # revoked meanwhile by another caller
        raise ProblemError(404, f"Key '{key_id}' not found") from err
    return Response(status_code=204)


def _form_field(content_type: str, raw: bytes, name: str) -> str | None:
    """Return a field of a urlencoded, multipart or JSON body (no form library needed)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        header = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = BytesParser(policy=policy.HTTP).parsebytes(header + raw)
        if not message.is_multipart():
            return None
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == name:
                payload = part.get_payload(decode=True)
                return payload.decode(errors="replace").strip() if isinstance(payload, bytes) else None
        return None
    if kind == "application/json":
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        value = data.get(name) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None
    values = parse_qs(raw.decode(errors="replace")).get(name)
    return values[0].strip() if values else None


class CallerInfoForm(BaseModel):
    """The body of NGC's key introspection (form-encoded, multipart or JSON); only documented here, since
    the route reads the three encodings itself.
    """

    credentials: str | None = Field(default=None, description="The key to describe; else the bearer key")


_CALLER_INFO_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            media: {"schema": CallerInfoForm.model_json_schema()}
            for media in ("application/x-www-form-urlencoded", "multipart/form-data", "application/json")
        },
    }
}


@router.post(
    "/v3/keys/get-caller-info",
    response_model=CallerInfo,
    response_model_exclude_unset=True,
    openapi_extra=_CALLER_INFO_BODY,
)
async def get_caller_info(request: Request, context: Context) -> dict[str, Any]:
    """NGC's key introspection: form field `credentials` (or the bearer key) → account and key type."""
    raw = await request.body()
    if len(raw) > MAX_CALLER_INFO_BODY:
        raise ProblemError(413, f"Request body larger than {MAX_CALLER_INFO_BODY} bytes")
    credentials = _form_field(request.headers.get("content-type", ""), raw, "credentials")
    key = credentials or bearer(request.headers.get("authorization"))
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
