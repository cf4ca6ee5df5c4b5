"""Standard Webhooks signatures: ``v1,`` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).

The secret is ``whsec_`` + base64 of the key bytes, as the specification and the
``standardwebhooks`` libraries write it; receivers verify with the same string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
MIN_KEY_BYTES = 24  # the specification recommends 24 to 64 bytes of randomness


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_...`` secret; ValueError saying what is expected otherwise
    (never echoing the secret)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"expected {SECRET_PREFIX} + base64 (a Standard Webhooks secret)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"expected {SECRET_PREFIX} followed by valid base64") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"expected at least {MIN_KEY_BYTES} bytes of key after {SECRET_PREFIX}")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value of one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers (and the content type) of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
        "content-type": "application/json",
    }
