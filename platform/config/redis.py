"""Redis clients and the invalidation channel every gateway process listens to."""
from functools import cache

import orjson
import redis
from django.conf import settings

# Messages are JSON objects: {"kind": "api_key", "key_hash": …}, {"kind": "tenant",
# "tenant_id": …}, {"kind": "all_keys"} or {"kind": "registry"}; receivers drop
# what they cached.
INVALIDATION_CHANNEL = "gateway:invalidate"


@cache
def redis_sync() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def invalidation_publish(*, kind: str, **fields: object) -> None:
    """Tell every gateway process to drop what it cached about one object.
    Best effort: caches also expire by themselves (GATEWAY_API_KEY_CACHE_SECONDS)."""
    try:
        redis_sync().publish(INVALIDATION_CHANNEL, orjson.dumps({"kind": kind, **fields}))
    except redis.RedisError:
        pass
