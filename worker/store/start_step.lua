-- A worker process starts a dispatched step and reads the payment's record, in one round trip:
-- it becomes the step's owner, and the lease runs from now. The sweeper puts the step back as
-- due as soon as the owner stops heartbeating (claim.lua, PAYPOLL_DEAD_AFTER), not only when
-- the lease runs out.
--
-- KEYS[1] inflight:<step>   KEYS[2] owners (HASH "<step>:<ref>" -> owner)   KEYS[3] record
-- ARGV[1] ref   ARGV[2] step   ARGV[3] owner   ARGV[4] lease in seconds
-- Returns {owned, record}: owned 1 when the step was in flight (now owned), 0 when it was not
-- (re-dispatched or done); record the payment's hash as a flat field, value list (empty when
-- there is no record). The record is read after the ownership is taken: what the step then
-- does is decided on the state it owns.
local owned = 0
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[4]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[2] .. ':' .. ARGV[1], ARGV[3])
  owned = 1
end
return {owned, redis.call('HGETALL', KEYS[3])}
