-- Claim an account's due steps for dispatch, within a budget of steps in flight, and put back
-- the steps whose lease ran out (a lost message or a killed worker): the durable timer and the
-- sweeper in one call.
--
-- KEYS[1] inflight:create   KEYS[2] inflight:track   KEYS[3] due:create   KEYS[4] due:track
-- ARGV[1] budget: most steps of this account in flight at once
-- ARGV[2] lease in seconds: how long a dispatched step may take before it is due again
-- ARGV[3] most steps claimed by this call
-- Returns {now, recovered, most_overdue_seconds, {create refs}, {track refs}}: the claimed refs
-- are now in flight with a lease of now + ARGV[2].
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local budget = tonumber(ARGV[1])
local lease_until = now + tonumber(ARGV[2])
local batch = tonumber(ARGV[3])

-- Leases that ran out go back to due, marked due now (they are overdue already).
local recovered = 0
for k = 1, 2 do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, batch)
  for _, ref in ipairs(expired) do
    redis.call('ZREM', KEYS[k], ref)
    redis.call('ZADD', KEYS[k + 2], now, ref)
    recovered = recovered + 1
  end
end

local overdue = 0
for k = 3, 4 do
  local first = redis.call('ZRANGE', KEYS[k], 0, 0, 'WITHSCORES')
  if first[2] and now - tonumber(first[2]) > overdue then
    overdue = now - tonumber(first[2])
  end
end

local free = budget - redis.call('ZCARD', KEYS[1]) - redis.call('ZCARD', KEYS[2])
if free > batch then
  free = batch
end
local claimed = {{}, {}}
-- Creates first: a tracking backlog must never delay new payments.
for k = 3, 4 do
  if free > 0 then
    local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, free)
    for _, ref in ipairs(due) do
      redis.call('ZREM', KEYS[k], ref)
      redis.call('ZADD', KEYS[k - 2], lease_until, ref)
      table.insert(claimed[k - 2], ref)
    end
    free = free - #due
  end
end
return {string.format('%.6f', now), recovered, string.format('%.6f', overdue), claimed[1], claimed[2]}
