-- Create a consumer group on the events stream unless it exists, with its read counter set
-- (ENTRIESREAD) so that Redis reports the group's lag from the start.
--
-- KEYS[1] events stream   ARGV[1] group   ARGV[2] start: '$' (from now), '0' (everything) or an id
-- Returns 1 when created, 0 when the group existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    for i = 1, #g, 2 do
      if g[i] == 'name' and g[i + 1] == ARGV[1] then
        return 0
      end
    end
  end
else
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM', 'ENTRIESREAD', 0)
  return 1
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local s = {}
for i = 1, #info, 2 do
  s[info[i]] = info[i + 1]
end
if ARGV[2] == '$' then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'ENTRIESREAD', s['entries-added'])
elseif ARGV[2] == '0' then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0',
             'ENTRIESREAD', s['entries-added'] - s['length'])
else
  -- Redis works out the counter for an arbitrary id when it can.
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2])
end
return 1
