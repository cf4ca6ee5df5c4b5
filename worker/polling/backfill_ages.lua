-- Add pending payments missing from the planner's age index (payments that became pending
-- before the index existed, i.e. under an older paypoll). Only payments still pending are
-- added, and an entry already there is kept (NX), so a transition that raced the caller's scan
-- is never undone.
--
-- KEYS[1] state:pending (SET)   KEYS[2] pending:age (ZSET ref -> created_at)
-- ARGV pairs: reference_id, created_at (Redis clock seconds)
-- Returns how many entries were added.
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 1 then
    added = added + redis.call('ZADD', KEYS[2], 'NX', ARGV[i + 1], ARGV[i])
  end
end
return added
