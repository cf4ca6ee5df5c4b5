-- A worker process starts a dispatched step: it becomes the step's owner, and the lease runs
-- from now. The sweeper puts the step back as due as soon as the owner stops heartbeating
-- (claim.lua, PAYPOLL_DEAD_AFTER), not only when the lease runs out.
--
-- KEYS[1] inflight:<step>   KEYS[2] owners (HASH "<step>:<ref>" -> owner)
-- ARGV[1] ref   ARGV[2] step   ARGV[3] owner   ARGV[4] lease in seconds
-- Returns 1 when the step was in flight (now owned), 0 when it was not (re-dispatched or done).
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[4]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2] .. ':' .. ARGV[1], ARGV[3])
return 1
