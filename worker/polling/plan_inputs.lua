-- What one key's poll plan is made from, in one call: pending payments per age bin, the learned
-- completion weights and the slots other software took.
--
-- KEYS[1] pending:age (ZSET ref -> created_at)   KEYS[2] completions (HASH bin -> weight)
-- KEYS[3] shared slots counter (STRING)
-- ARGV[1..n] the age bin edges in seconds, ascending, starting at 0 (the last bin is unbounded)
-- Returns {now, {count per bin}, {bin, weight, bin, weight, ...}, shared slots so far}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local counts = {}
local n = #ARGV
for i = 1, n do
  -- age in [edge_i, edge_i+1)  <=>  created_at in (now - edge_i+1, now - edge_i]
  local newest = now - tonumber(ARGV[i])
  local oldest = '-inf'
  if i < n then
    oldest = '(' .. string.format('%.6f', now - tonumber(ARGV[i + 1]))
  end
  local upper = string.format('%.6f', newest)
  if i == 1 then
    upper = '+inf'  -- a created_at a hair ahead of TIME (clock step) is age 0, not lost
  end
  table.insert(counts, redis.call('ZCOUNT', KEYS[1], oldest, upper))
end
return {string.format('%.6f', now), counts, redis.call('HGETALL', KEYS[2]),
        redis.call('GET', KEYS[3]) or '0'}
