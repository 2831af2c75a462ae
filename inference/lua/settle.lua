-- Settles one request admitted by admit.lua: replaces its reservation with what it
-- used, frees its concurrency slot, and records budget alerts once per month.
--
-- KEYS: as admit.lua (5 per scope, 2 scopes).
-- ARGV: now_ms, rid, tokens_used, cost_micros_used, window_s, then per scope 3:
--   budget_micros, budget_tokens, alert_percent.
-- Returns a flat list of alerts: {scope, 'soft'|'hard', 'spend'|'tokens', ...}.

local now_ms = tonumber(ARGV[1])
local rid = ARGV[2]
local used_tokens = tonumber(ARGV[3])
local used_cost = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local oldest = math.floor(now_ms / 1000) - window + 1
local alerts = {}

local function crossed(budget, field, used, limit, percent, scope, kind, name)
  if limit > 0 and used * 100 >= limit * percent and redis.call('HSETNX', budget, field, now_ms) == 1 then
    table.insert(alerts, scope)
    table.insert(alerts, kind)
    table.insert(alerts, name)
  end
end

for scope = 1, 2 do
  local k = (scope - 1) * 5
  local a = 5 + (scope - 1) * 3
  local budget_micros, budget_tokens, percent = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tok_key, inflight, reservations, budget = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]

  local reserved_tokens, reserved_cost, slot = 0, 0, nil
  local r = redis.call('HGET', reservations, rid)
  if r then
    local t, c, s = string.match(r, '(%d+):(%d+):(%d+)')
    reserved_tokens, reserved_cost, slot = tonumber(t), tonumber(c), tonumber(s)
    redis.call('HDEL', reservations, rid)
  end
  redis.call('ZREM', inflight, rid)

  -- The tokens window: the admission slot is corrected to the actual count while it
  -- still counts; a request whose reservation was already reclaimed counts now.
  if slot and slot >= oldest and redis.call('HEXISTS', tok_key, slot) == 1 then
    redis.call('HINCRBY', tok_key, slot, used_tokens - reserved_tokens)
    redis.call('HINCRBY', tok_key, 'sum', used_tokens - reserved_tokens)
  elseif not r then
    local now_slot = math.floor(now_ms / 1000)
    if redis.call('EXISTS', tok_key) == 0 then
      -- The window had expired: it starts again, and lives as admit.lua's do.
      redis.call('HSET', tok_key, 'tail', now_slot)
      redis.call('EXPIRE', tok_key, window * 2)
    end
    redis.call('HINCRBY', tok_key, now_slot, used_tokens)
    redis.call('HINCRBY', tok_key, 'sum', used_tokens)
  end

  if redis.call('EXISTS', budget) == 1 then
    redis.call('HINCRBY', budget, 'reserved_micros', 0 - reserved_cost)
    redis.call('HINCRBY', budget, 'reserved_tokens', 0 - reserved_tokens)
    local spent_micros = redis.call('HINCRBY', budget, 'spent_micros', used_cost)
    local spent_tokens = redis.call('HINCRBY', budget, 'spent_tokens', used_tokens)
    crossed(budget, 'soft_spend', spent_micros, budget_micros, percent, scope, 'soft', 'spend')
    crossed(budget, 'soft_tokens', spent_tokens, budget_tokens, percent, scope, 'soft', 'tokens')
    crossed(budget, 'hard_spend_alert', spent_micros, budget_micros, 100, scope, 'hard', 'spend')
    crossed(budget, 'hard_tokens_alert', spent_tokens, budget_tokens, 100, scope, 'hard', 'tokens')
  end
end
return alerts
