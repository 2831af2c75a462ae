"""The limiter's Lua scripts on a real Redis, with the clock in the test's hands:
the windows slide (a busy key is never locked out), and what they write expires."""
import uuid

import pytest

from config.redis import redis_sync
from inference.limits import LUA_DIR, WINDOW_SECONDS

ADMIT = (LUA_DIR / "admit.lua").read_text()
SETTLE = (LUA_DIR / "settle.lua").read_text()
T0 = 1_800_000_000_000  # ms, the start of a one-second slot


@pytest.fixture
def window_keys():
    prefix = f"test-scripts:{uuid.uuid4().hex}"
    keys = [f"{prefix}:{scope}:{name}" for scope in (1, 2)
            for name in ("requests", "tokens", "inflight", "reservations", "budget")]
    yield keys
    redis_sync().delete(*keys)


def admit(keys, now_ms: int, rid: str, *, rpm: int = 0, tpm: int = 0, tokens: int = 10, lease_ms: int = 600_000):
    """admit.lua for a key with these limits and an unlimited tenant."""
    return redis_sync().eval(ADMIT, len(keys), *keys, now_ms, rid, lease_ms, tokens, 0, WINDOW_SECONDS,
                             rpm, tpm, 0, 0, 0, 80, 0, 0, 0, 0, 0, 80)


def settle(keys, now_ms: int, rid: str, used: int):
    return redis_sync().eval(SETTLE, len(keys), *keys, now_ms, rid, used, 0, WINDOW_SECONDS, 0, 0, 80, 0, 0, 80)


def test_a_key_used_steadily_at_its_limit_is_never_locked_out(window_keys):
    # Two requests a minute, every 30 s, for ten minutes: the key never idles long
    # enough to expire, so only a sliding window lets every one of them in.
    for i in range(20):
        assert admit(window_keys, T0 + i * 30_000, f"r{i}", rpm=2)[0] == 0, f"request {i} refused"
    # A third within any 60 s is still refused.
    assert admit(window_keys, T0 + 19 * 30_000 + 1_000, "extra", rpm=2)[:2] == [1, b"requests"]


def test_retry_after_names_the_moment_the_window_has_room(window_keys):
    assert admit(window_keys, T0 + 200, "a", rpm=2)[0] == 0
    assert admit(window_keys, T0 + 5_300, "b", rpm=2)[0] == 0
    refused = admit(window_keys, T0 + 30_000, "c", rpm=2)
    assert refused[:2] == [1, b"requests"]
    # "a" counts for the whole of its one-second slot's minute.
    assert refused[2] == 30_000
    retry_at = T0 + 30_000 + refused[2]
    assert admit(window_keys, retry_at - 1, "early", rpm=2)[0] == 1
    assert admit(window_keys, retry_at, "on-time", rpm=2)[0] == 0
    # The window now holds "b" and "on-time": full until "b" leaves it.
    assert admit(window_keys, retry_at + 1_000, "next", rpm=2)[:2] == [1, b"requests"]


def test_settled_tokens_leave_the_window_a_minute_after_admission(window_keys):
    tpm = 100
    assert admit(window_keys, T0, "a", tpm=tpm, tokens=80)[0] == 0
    assert admit(window_keys, T0 + 1_000, "b", tpm=tpm, tokens=30)[:2] == [1, b"tokens"]
    settle(window_keys, T0 + 2_000, "a", used=40)  # reserved 80, used 40
    assert admit(window_keys, T0 + 3_000, "b", tpm=tpm, tokens=50)[0] == 0
    # At T0 + 60 s the slot of "a" (40) leaves; "b" (50) stays until T0 + 63 s.
    assert admit(window_keys, T0 + 59_999, "c", tpm=tpm, tokens=20)[:2] == [1, b"tokens"]
    assert admit(window_keys, T0 + 60_000, "c", tpm=tpm, tokens=50)[0] == 0
    assert redis_sync().hget(window_keys[1], "sum") == b"100"


def test_a_window_written_without_its_tail_still_slides(window_keys):
    # As windows were written before they kept their tail.
    slot = T0 // 1000
    redis_sync().hset(window_keys[0], mapping={str(slot): 2, "sum": 2})
    redis_sync().expire(window_keys[0], 600)
    assert admit(window_keys, T0 + 10_000, "a", rpm=2)[0] == 1
    assert admit(window_keys, T0 + 60_000, "b", rpm=2)[0] == 0
    assert redis_sync().hget(window_keys[0], "sum") == b"1"


def test_windows_expire_even_when_only_a_late_settlement_wrote_them(window_keys):
    # A reservation reclaimed after its lease ran out, settled after the windows
    # expired: the usage counts, and the recreated window expires too.
    assert admit(window_keys, T0, "a", tpm=1000, lease_ms=1_000)[0] == 0
    client = redis_sync()
    client.delete(window_keys[0], window_keys[1])
    assert admit(window_keys, T0 + 2_000, "b", tpm=1000)[0] == 0  # reclaims "a"
    client.delete(window_keys[1])
    settle(window_keys, T0 + 3_000, "a", used=7)
    assert client.hget(window_keys[1], "sum") == b"7"
    assert 0 < client.ttl(window_keys[1]) <= 2 * WINDOW_SECONDS
