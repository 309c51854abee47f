"""The router's key rule, one place for every protocol (HTTP's BearerAuth, Triton's gRPC).

Without an admin key, the API key (when set) guards everything. With one, admin calls
(placing and evicting models) take the admin key alone and every other call takes either;
so inference clients cannot evict models. Every key is compared, each in constant time, so
timing does not say which one was close.
"""

from __future__ import annotations

import hmac


class Keys:
    def __init__(self, api_key: str | None, admin_key: str | None = None) -> None:
        self._api = api_key.encode() if api_key else None
        self._admin = admin_key.encode() if admin_key else None

    @property
    def has_admin_key(self) -> bool:
        return self._admin is not None

    def allows(self, authorization: str, admin: bool) -> bool:
        """Whether an `Authorization` value (`Bearer <key>`) may make a call (an admin one or not)."""
        accepted = ([self._admin] if admin else [self._api, self._admin]) if self._admin else [self._api]
        keys = [k for k in accepted if k is not None]
        if not keys:
            return True
        scheme, _, token = authorization.partition(" ")
        given = token.strip().encode()
        matches = [hmac.compare_digest(given, k) for k in keys]
        return scheme.lower() == "bearer" and any(matches)
