-- reserve.lua: book the next free slot of one rate-limited API key, or say how far off it is.
--
-- Evenly spaced slots: a key's slots are `interval` apart (1/rate + margin), so any N+1
-- consecutive slots span N*interval > N/rate seconds and no sliding 1-second window can hold
-- more than `rate` of them. Redis TIME is the only clock; the caller's clock is never read.
--
-- KEYS[1]  the key's limiter state: a string holding its next free slot (the "theoretical
--          arrival time"), integer microseconds on this server's clock. Absent means "free now".
--          The script sets a TTL that ends when that slot is in the past, where absence and the
--          stored value mean the same thing.
-- ARGV[1]  interval between two slots, integer microseconds, > 0
-- ARGV[2]  max wait, integer microseconds, >= 0: a slot at most this far from now is booked for
--          a caller who sleeps until it
-- ARGV[3]  max ahead, integer microseconds, >= max wait: a slot further than max wait but at
--          most this far is booked and held for a caller who comes back for it (an actor
--          reschedules its job); a slot further than this is NOT booked. This caps how much of
--          a key's capacity callers that die before their slot can waste.
--
-- ARGV[4]  '1' under Sentinel (else '0' or absent): a change of master is a change of clock
--          and of state (the new master's copy of this key may be older than what the old
--          master granted), so the first reservation on a new master (its replication id
--          differs from the one KEYS[2] remembers, or none is remembered) starts one window
--          (ARGV[5] microseconds) from now: the calls the old master granted in the last
--          second can no longer share a window with new ones.
-- KEYS[2]  (with ARGV[4] = '1') the replication id this key was last booked under
--
-- Returns  {slot, now, granted}
--          slot     the key's next free slot (microseconds, Redis clock)
--          now      Redis TIME when the script ran (microseconds)
--          granted  1: the slot is booked for the caller, who may start at `slot`;
--                   2: the slot is booked and held: more than max wait but at most max ahead
--                      away;
--                   0: the slot is more than max ahead away and nothing was written.
--
-- Numbers are written with string.format('%.0f'): Lua 5.1's tostring keeps 14 significant
-- digits, and microsecond timestamps have 16.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local max_ahead = tonumber(ARGV[3])

local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if slot < now then
    slot = now
end
if ARGV[4] == '1' then
    local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
    if redis.call('GET', KEYS[2]) ~= replid then
        redis.call('SET', KEYS[2], replid)
        if slot < now + tonumber(ARGV[5]) then
            slot = now + tonumber(ARGV[5])
        end
    end
end

local granted = 1
if slot - now > max_wait then
    if slot - now > max_ahead then
        return {slot, now, 0}
    end
    granted = 2
end

local next_free = slot + interval
local ttl_ms = math.floor((next_free - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', next_free), 'PX', string.format('%.0f', ttl_ms))
return {slot, now, granted}
