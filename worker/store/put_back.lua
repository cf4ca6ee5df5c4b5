-- Put steps a worker process claimed but never started back as due now: a stopping process's
-- local queue (worker/local_steps.py), so the next sweep pass dispatches them at once instead
-- of after their lease. A step goes back only while it is still in flight and still owned by
-- that process (another process may have been given it meanwhile).
--
-- KEYS[1] inflight:<step>   KEYS[2] due:<step>   KEYS[3] owners (HASH "<step>:<ref>" -> process)
-- ARGV[1] the step ('create' or 'track')   ARGV[2] the process   ARGV[3..] references
-- Returns the number of steps put back.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local back = 0
for i = 3, #ARGV do
  local field = ARGV[1] .. ':' .. ARGV[i]
  if redis.call('HGET', KEYS[3], field) == ARGV[2] then
    redis.call('HDEL', KEYS[3], field)
    if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
      redis.call('ZADD', KEYS[2], now, ARGV[i])
      back = back + 1
    end
  end
end
return back
