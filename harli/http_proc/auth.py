"""API keys: read from ``http.api_keys_file``, checked as ``Authorization: Bearer KEY``.

Compared in constant time. The owner of what a key creates (files, fine-tuning jobs) is a
digest of the key, never the key itself, so the job store holds no secret.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

# The owner of everything made without keys configured (a loopback-only API).
NO_KEYS_OWNER = ""


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """Keys one per line, blank lines and ``#`` comments ignored; ValueError naming the
        file when it cannot be read or holds none."""
        if not path:
            return cls([])
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"http.api_keys_file: cannot read {path}: {e.strerror}") from None
        keys = [line.strip() for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ValueError(f"http.api_keys_file: {path} holds no key")
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of the request's key; None when a key is required and this one is
        missing or wrong."""
        if not self._keys:
            return NO_KEYS_OWNER
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token.strip().encode()
        for key in self._keys:
            if hmac.compare_digest(given, key):
                return hashlib.sha256(key).hexdigest()[:16]
        return None
