-- Atomic check-and-reserve for one request, for two scopes at once: the API key
-- (scope 1) and its tenant (scope 2). Nothing is changed unless every limit of
-- both scopes admits the request.
--
-- KEYS, per scope (5 each): requests window, tokens window, in-flight zset,
--   reservations hash, budget hash (of the current month).
-- ARGV: now_ms, rid, lease_ms, tokens, cost_micros, window_s, then per scope 6:
--   rpm, tpm, concurrency, budget_micros, budget_tokens, (unused here: alert %).
--   A limit of 0 means none.
--
-- Windows are hashes of one-second slots plus fields `sum` and `tail` (the oldest
-- slot still counted): a request counts for `window_s` seconds after it was
-- admitted, whatever the slot boundaries, so no 60 s span ever holds more than
-- the limit.
--
-- Returns {0, req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining,
--          tok_reset_ms} when admitted, {1, reason, retry_after_ms, req_limit,
-- req_remaining, req_reset_ms, tok_limit, tok_remaining, tok_reset_ms, scope} when a
-- rate limit of `scope` refuses it (or a budget held by requests in flight:
-- 'budget_reserved'; the figures are that scope's, for the response's headers),
-- {2, reason, scope} when a budget is exhausted, {3, scope} when a budget must first
-- be loaded from the database (budget_init.lua).

local now_ms = tonumber(ARGV[1])
local rid = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local slot = math.floor(now_ms / 1000)
local oldest = slot - window + 1

local function advance(key)
  -- Drops slots that left the window; returns the window's sum.
  local state = redis.call('HMGET', key, 'sum', 'tail')
  local sum = tonumber(state[1]) or 0
  local tail = tonumber(state[2])
  if not tail then
    -- A new window, or one whose tail was never written: its oldest slot.
    tail = oldest
    if state[1] then
      for _, field in ipairs(redis.call('HKEYS', key)) do
        local s = tonumber(field)
        if s and s < tail then
          tail = s
        end
      end
      redis.call('HSET', key, 'tail', tail)
    end
  end
  if tail < oldest then
    if oldest - tail >= window then
      redis.call('DEL', key)
      sum = 0
    else
      for s = tail, oldest - 1 do
        local v = redis.call('HGET', key, s)
        if v then
          sum = sum - tonumber(v)
          redis.call('HDEL', key, s)
        end
      end
    end
    redis.call('HSET', key, 'sum', sum, 'tail', oldest)
  end
  return sum
end

local function retry_after_ms(key, excess)
  -- Milliseconds until enough of the window expires to free `excess`.
  local freed = 0
  for s = oldest, slot do
    local v = tonumber(redis.call('HGET', key, s) or 0)
    freed = freed + v
    if freed >= excess then
      return (s + window) * 1000 - now_ms
    end
  end
  return window * 1000
end

local function reclaim_expired(inflight, reservations, budget)
  -- Gives back what requests whose lease ran out (their gateway died) reserved
  -- from the budget. Their estimate stays in its slot of the tokens window (no
  -- settle will correct it) and leaves with that slot, like any other count.
  local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now_ms)
  for _, old in ipairs(expired) do
    local r = redis.call('HGET', reservations, old)
    if r then
      local t, c = string.match(r, '(%d+):(%d+):%d+')
      redis.call('HINCRBY', budget, 'reserved_micros', 0 - tonumber(c))
      redis.call('HINCRBY', budget, 'reserved_tokens', 0 - tonumber(t))
      redis.call('HDEL', reservations, old)
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
  end
end

-- Every scope's windows are brought up to date first, whatever the verdict, so
-- that a refusal can report the figures of both scopes.
local sums, limits = {}, {}
for scope = 1, 2 do
  local k = (scope - 1) * 5
  local a = 6 + (scope - 1) * 6
  local budget_micros, budget_tokens = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  limits[scope] = {tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), budget_micros, budget_tokens}
  if budget_micros > 0 or budget_tokens > 0 then
    if redis.call('HEXISTS', KEYS[k + 5], 'init') == 0 then
      return {3, scope}
    end
  end
  reclaim_expired(KEYS[k + 3], KEYS[k + 4], KEYS[k + 5])
  sums[scope] = {advance(KEYS[k + 1]), advance(KEYS[k + 2])}
end

local function figures(more_requests, more_tokens)
  -- {req_limit, req_remaining, req_reset_ms, tok_limit, tok_remaining, tok_reset_ms}:
  -- per limit, the scope with the least room left once `more_*` are counted.
  local f = {0, -1, 0, 0, -1, 0}
  local reset = window * 1000 - (now_ms % 1000)
  for scope = 1, 2 do
    local rpm, tpm = limits[scope][1], limits[scope][2]
    local req_left = rpm - sums[scope][1] - more_requests
    local tok_left = tpm - sums[scope][2] - more_tokens
    if rpm > 0 and (f[2] < 0 or req_left < f[2]) then
      f[1], f[2], f[3] = rpm, req_left, reset
    end
    if tpm > 0 and (f[5] < 0 or tok_left < f[5]) then
      f[4], f[5], f[6] = tpm, tok_left, reset
    end
  end
  f[2], f[5] = math.max(f[2], 0), math.max(f[5], 0)
  return f
end

local function refuse(reason, retry_ms, scope)
  -- A refusal, with the figures as they stand; the refused limit's are the refusing
  -- scope's, reset when there is room again.
  local f = figures(0, 0)
  if reason == 'requests' then
    f[1], f[2], f[3] = limits[scope][1], 0, retry_ms
  elseif reason == 'tokens' then
    local tpm = limits[scope][2]
    f[4], f[5], f[6] = tpm, math.max(tpm - sums[scope][2], 0), retry_ms
  end
  return {1, reason, retry_ms, f[1], f[2], f[3], f[4], f[5], f[6], scope}
end

for scope = 1, 2 do
  local k = (scope - 1) * 5
  local rpm, tpm, conc, budget_micros, budget_tokens = unpack(limits[scope])
  local req_key, tok_key, inflight, budget = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 5]
  local req_sum, tok_sum = sums[scope][1], sums[scope][2]

  if rpm > 0 and req_sum + 1 > rpm then
    return refuse('requests', retry_after_ms(req_key, req_sum + 1 - rpm), scope)
  end
  if tpm > 0 and tok_sum + tokens > tpm then
    if tokens > tpm then
      return refuse('tokens_request_too_large', 0, scope)
    end
    return refuse('tokens', retry_after_ms(tok_key, tok_sum + tokens - tpm), scope)
  end
  if conc > 0 and redis.call('ZCARD', inflight) + 1 > conc then
    return refuse('concurrency', 1000, scope)
  end
  if budget_micros > 0 or budget_tokens > 0 then
    local b = redis.call('HMGET', budget, 'spent_micros', 'reserved_micros', 'spent_tokens', 'reserved_tokens')
    local used_micros = (tonumber(b[1]) or 0) + math.max(tonumber(b[2]) or 0, 0)
    local used_tokens = (tonumber(b[3]) or 0) + math.max(tonumber(b[4]) or 0, 0)
    -- Exhausted when what was spent leaves no room; held back (retry soon) when
    -- only the reservations of requests in flight are in the way.
    if budget_micros > 0 and (used_micros >= budget_micros or used_micros + cost > budget_micros) then
      local spent = tonumber(b[1]) or 0
      if spent >= budget_micros or spent + cost > budget_micros then
        return {2, 'spend', scope}
      end
      return refuse('budget_reserved', 1000, scope)
    end
    if budget_tokens > 0 and (used_tokens >= budget_tokens or used_tokens + tokens > budget_tokens) then
      local spent = tonumber(b[3]) or 0
      if spent >= budget_tokens or spent + tokens > budget_tokens then
        return {2, 'tokens', scope}
      end
      return refuse('budget_reserved', 1000, scope)
    end
  end
end

local expire_s = window * 2 + math.ceil(lease_ms / 1000)
for scope = 1, 2 do
  local k = (scope - 1) * 5
  local req_key, tok_key, inflight, reservations, budget =
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  -- Expiries are refreshed by the first request of each second only (4 calls saved
  -- per scope on a busy key); a key idle for expire_s disappears.
  local first_in_slot = redis.call('HINCRBY', req_key, slot, 1) == 1
  redis.call('HINCRBY', req_key, 'sum', 1)
  redis.call('HINCRBY', tok_key, slot, tokens)
  redis.call('HINCRBY', tok_key, 'sum', tokens)
  redis.call('ZADD', inflight, now_ms + lease_ms, rid)
  redis.call('HSET', reservations, rid, tokens .. ':' .. cost .. ':' .. slot)
  if redis.call('EXISTS', budget) == 1 then
    redis.call('HINCRBY', budget, 'reserved_micros', cost)
    redis.call('HINCRBY', budget, 'reserved_tokens', tokens)
  end
  if first_in_slot then
    -- A window starts with its tail; without one it would never slide.
    redis.call('HSETNX', req_key, 'tail', slot)
    redis.call('HSETNX', tok_key, 'tail', slot)
    redis.call('EXPIRE', req_key, expire_s)
    redis.call('EXPIRE', tok_key, expire_s)
    redis.call('EXPIRE', inflight, expire_s)
    redis.call('EXPIRE', reservations, expire_s)
  end
end
local best = figures(1, tokens)
return {0, best[1], best[2], best[3], best[4], best[5], best[6]}
