"""HMAC signatures on decisions: the orchestrator acts only on what the decide agent signed."""
from __future__ import annotations

import hashlib
import hmac

from cicd.core.events import canonical


def sign(body: dict, key: bytes) -> str:
    return hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()


def is_valid(body: dict, signature: str, key: bytes) -> bool:
    if not isinstance(signature, str) or len(signature) != 64:
        return False
    try:
        expected = sign(body, key)
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(expected, signature)
