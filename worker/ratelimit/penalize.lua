-- penalize.lua: after a 429, push one API key's next free slot to now + pause, for every process.
--
-- KEYS[1]  the key's limiter state (see reserve.lua): next free slot, integer microseconds on
--          the Redis clock
-- ARGV[1]  pause, integer microseconds, >= 0
--
-- Returns  {next_free, now}: the key's next free slot after the penalty and Redis TIME, both in
--          microseconds. A slot already later than now + pause is kept (a penalty never brings
--          the next slot closer).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local resume = now + tonumber(ARGV[1])

local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_free < resume then
    next_free = resume
    local ttl_ms = math.floor((next_free - now) / 1000) + 1
    redis.call('SET', KEYS[1], string.format('%.0f', next_free), 'PX', string.format('%.0f', ttl_ms))
end
return {next_free, now}
