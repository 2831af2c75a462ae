"""API key authentication for the gateway, with no database call per request.

Principals are cached per process for GATEWAY_API_KEY_CACHE_SECONDS; revocations and
suspensions are pushed over Redis (config.redis.INVALIDATION_CHANNEL) and evict
entries at once. Unknown keys are cached too, so a flood of bad keys cannot reach
PostgreSQL more than once per key and interval."""
import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

from tenants.selectors import ApiKeyPrincipal

from . import errors

# Largest number of cached keys; past it the cache starts over (a burst of
# random bad keys must not grow memory without bound).
CACHE_MAX_ENTRIES = 100_000

PrincipalLoader = Callable[[str], Awaitable[ApiKeyPrincipal | None]]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class ApiKeyAuthenticator:
    def __init__(self, *, load: PrincipalLoader, ttl_seconds: float) -> None:
        self._load = load
        self._ttl = ttl_seconds
        # key hash -> (monotonic expiry, principal or None for an unknown key)
        self._entries: dict[str, tuple[float, ApiKeyPrincipal | None]] = {}
        self._loading: dict[str, asyncio.Future] = {}

    async def authenticate(self, raw_key: str | None) -> ApiKeyPrincipal:
        """Returns the key's principal or raises the ApiError a caller should see."""
        if not raw_key:
            raise errors.missing_api_key()
        key_hash = hashlib.sha256(raw_key.encode()).hexdigest()
        now = time.monotonic()
        entry = self._entries.get(key_hash)
        if entry is not None and entry[0] > now:
            principal = entry[1]
        else:
            principal = await self._load_once(key_hash)
        return self._check(principal)

    async def _load_once(self, key_hash: str) -> ApiKeyPrincipal | None:
        # Concurrent misses for one key share a single lookup.
        pending = self._loading.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[key_hash] = future
        try:
            principal = await self._load(key_hash)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            del self._loading[key_hash]
        if len(self._entries) >= CACHE_MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self._ttl, principal)
        future.set_result(principal)
        return principal

    @staticmethod
    def _check(principal: ApiKeyPrincipal | None) -> ApiKeyPrincipal:
        if principal is None:
            raise errors.invalid_api_key()
        if principal.revoked:
            raise errors.invalid_api_key("This API key has been revoked.")
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise errors.invalid_api_key("This API key has expired.")
        if principal.tenant_status != "active":
            raise errors.tenant_suspended(principal.suspended_reason)
        return principal

    def forget_key(self, key_hash: str) -> None:
        self._entries.pop(key_hash, None)

    def forget_all(self) -> None:
        self._entries.clear()

    def forget_tenant(self, tenant_id: int) -> None:
        stale = [h for h, (_, p) in self._entries.items() if p is not None and p.tenant_id == tenant_id]
        for key_hash in stale:
            del self._entries[key_hash]
