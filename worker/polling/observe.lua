-- Add one completion to a key's learned completion-age distribution, fading old ones.
--
-- KEYS[1] completions (HASH bin index -> weight, and 'total')
-- ARGV[1] cap of the total weight kept   ARGV[2..] bin, weight pairs of this completion
-- When the total passes the cap, every weight is scaled down so the total is the cap: the
-- newest completions always count, the oldest fade (an exponential memory of about cap payments).
-- Returns the total weight after the call.
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  total = total + tonumber(ARGV[i + 1])
end
local cap = tonumber(ARGV[1])
if total > cap then
  local scale = cap / total
  local all = redis.call('HGETALL', KEYS[1])
  local scaled = {}
  for i = 1, #all, 2 do
    if all[i] ~= 'total' then
      table.insert(scaled, all[i])
      table.insert(scaled, string.format('%.9g', tonumber(all[i + 1]) * scale))
    end
  end
  if #scaled > 0 then
    redis.call('HSET', KEYS[1], unpack(scaled))
  end
  total = cap
end
redis.call('HSET', KEYS[1], 'total', string.format('%.9g', total))
return string.format('%.9g', total)
