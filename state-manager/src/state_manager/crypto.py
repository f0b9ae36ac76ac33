"""AES-256-GCM encryption of graph secrets.

Stored form: URL-safe base64 (with ``=`` padding) of
``nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)``, with a fresh random nonce per
value and no associated data: the format the v0 contract describes, so a database
can be shared with other implementations.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from state_manager.settings import decode_encryption_key

NONCE_BYTES = 12


class SecretDecryptionError(ValueError):
    """A stored secret could not be decrypted (wrong key or corrupted value)."""


class SecretBox:
    """Encrypts and decrypts secret values under one key. Never logs values."""

    def __init__(self, key_text: str) -> None:
        self._aead = AESGCM(decode_encryption_key(key_text))

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def encrypt(self, plaintext: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), None)
        return base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, stored: str) -> str:
        try:
            raw = base64.urlsafe_b64decode(stored.encode("ascii"))
            opened = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None)
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretDecryptionError("stored secret cannot be decrypted with this key") from None
        return opened.decode("utf-8")
