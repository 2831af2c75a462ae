-- Loads a budget's month-to-date spend, read from PostgreSQL, unless another
-- process loaded it first (the first load wins: later ones would double count).
-- KEYS[1]: budget hash. ARGV: spent_micros, spent_tokens, ttl_s.
if redis.call('HSETNX', KEYS[1], 'init', 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'spent_micros', tonumber(ARGV[1]))
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', tonumber(ARGV[2]))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
