-- poll_start.lua: a poll's first round trip. The worker owns the track step and reads the
-- payment's record (start_step.lua), and, when the record is pending and holds no slot from an
-- earlier run, books the key's next slot for the poll's GET (reserve.lua), in one script.
--
-- worker/poll_start.py puts this after the texts of start_step.lua and reserve.lua, each
-- wrapped as a function of (KEYS, ARGV): their own documentation says what they take and do.
--
-- KEYS[1..3] start_step's keys (inflight:track, owners, record); KEYS[4..] reserve's keys
-- ARGV[1..4] start_step's args (ref, step, owner, lease); ARGV[5] the pending state's name;
-- ARGV[6..] reserve's args
-- Returns start_step's {owned, record}, followed by reserve's {slot, now, granted} when a
-- slot was asked for.
local started = start_step({KEYS[1], KEYS[2], KEYS[3]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]})
if started[1] ~= 1 or redis.call('HGET', KEYS[3], 'state') ~= ARGV[5] then
  return started
end
if (redis.call('HGET', KEYS[3], 'slot_hold') or '') ~= '' then
  return started  -- the run takes up the slot an earlier run held for it
end
local reserve_keys, reserve_args = {}, {}
for i = 4, #KEYS do reserve_keys[#reserve_keys + 1] = KEYS[i] end
for i = 6, #ARGV do reserve_args[#reserve_args + 1] = ARGV[i] end
local booked = reserve(reserve_keys, reserve_args)
return {started[1], started[2], booked[1], booked[2], booked[3]}
