"""Sealing of function secrets: values are encrypted before they enter any workflow data."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class SecretBox:
    """AES-256-GCM with a key shared by the API (which seals) and the workers (which open)."""

    def __init__(self, key: str) -> None:
        raw = base64.urlsafe_b64decode(key.encode())
        if len(raw) != 32:
            raise ValueError("GPUFN_SECRET_KEY must be 32 bytes, urlsafe-base64 encoded")
        self._aead = AESGCM(raw)

    def seal(self, plaintext: str, context: str) -> str:
        """Encrypt `plaintext`, bound to `context` (the version and secret name)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, sealed: str, context: str) -> str:
        """Decrypt a value sealed with the same `context`."""
        raw = base64.urlsafe_b64decode(sealed.encode())
        return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()


def secret_context(version_id: str, name: str) -> str:
    """Return the associated data a secret is sealed with, so it cannot be moved to another version."""
    return f"{version_id}/{name}"
