-- fence.lua: a call reached the wire later than its slot allows; keep the key's next calls
-- out of every 1-second window that call may be in, for every process.
--
-- Evenly spaced slots leave `calls * interval - 1 s` of slack per window (reserve.lua). A call
-- sent later than that after its slot can share a window with the call `calls` slots after
-- it: `calls + 1` calls in one window, a 429. The caller checks its lateness right before the
-- write, but a thread can lose the CPU (the GIL, the hypervisor) between that check and the
-- write itself; it reads the clock again once the write is done and, when that reading is too
-- late, calls this: the key's next free slot moves so that the `calls`-th slot after the late
-- call falls at least `window` after it was sent. Slots booked before this runs are not moved.
--
-- KEYS[1]  the key's limiter state (see reserve.lua): next free slot, integer microseconds
-- ARGV[1]  the late call's slot (microseconds, Redis clock)
-- ARGV[2]  the latest it can have been sent (microseconds, Redis clock)
-- ARGV[3]  interval between two slots (microseconds)
-- ARGV[4]  calls allowed per window (a whole number >= 1)
-- ARGV[5]  window (microseconds): 1 s plus the limiter's margin
--
-- Returns  {next_free, now, moved}: the key's next free slot after the fence, Redis TIME
--          (microseconds), and 1 when the fence moved it (0: it was far enough already, or
--          the slot that must move was booked already).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = tonumber(ARGV[1])
local sent = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local calls = tonumber(ARGV[4])
local window = tonumber(ARGV[5])

local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
-- The next booking takes the stored slot, or now when that is past, and never one before the
-- slot after the late call's (its own booking set at least that).
local next_free = math.max(stored, now, slot + interval)
-- The next booking is the k-th slot after the late call's.
local k = math.floor((next_free - slot) / interval + 0.5)
if k < 1 or k > calls then
    return {next_free, now, 0}
end
local needed = sent + window - (calls - k) * interval
if next_free >= needed then
    return {next_free, now, 0}
end
local ttl_ms = math.floor((needed - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', needed), 'PX', string.format('%.0f', ttl_ms))
return {needed, now, 1}
