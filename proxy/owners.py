"""Who owns what is stored: the hash of the API key that created it, never the key."""

from __future__ import annotations

import hashlib


def owner_of(api_key: bytes | None) -> str:
    """Stored objects belong to the hash of the key that created them ("" without keys)."""
    return hashlib.sha256(api_key).hexdigest()[:32] if api_key else ""
