"""API keys: who may call the server, and the namespace each key's sessions live in.

Sessions are stored under ids that start with their key's namespace (a digest of the key, never the key), so
one key can neither name, list, continue nor delete another key's sessions, whatever id it sends.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from .errors import ApiError

#: The namespace of every session when the server has no API key.
OPEN_NAMESPACE = "open"


class ApiKeys:
    """The accepted keys (none: every request is accepted, in one namespace)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode() for key in keys]
        for key in self._keys:
            if len(key) < 16 or any(byte <= 0x20 or byte >= 0x7F for byte in key):
                raise ValueError(
                    "an API key must be at least 16 printable ASCII characters without spaces, found one of "
                    f"{len(key)} bytes{'' if len(key) < 16 else ' with other characters'}"
                )

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def namespace(self, authorization: str | None) -> str:
        """The namespace of the key in an ``Authorization: Bearer KEY`` header; ApiError 401 without one."""
        if not self._keys:
            return OPEN_NAMESPACE
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
            )
        candidate = presented.strip().encode()
        # Every key is compared, in constant time each, so the time taken does not tell which one came close.
        matches = [hmac.compare_digest(candidate, key) for key in self._keys]
        if not any(matches):
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return "k" + hashlib.sha256(candidate).hexdigest()[:24]


def read_key_file(path: str | Path) -> list[str]:
    """The keys in a file: one per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
