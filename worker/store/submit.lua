-- Record a new payment, unless one with this (account, reference_id) exists.
--
-- KEYS[1] the payment record (hash)         KEYS[2] the set of the initial state
-- KEYS[3] the due set of the first step      KEYS[4] the events stream (the account's outbox on
--         a cluster, see worker/keys.py)
-- KEYS[5] (when the initial state is pending) pending:age, the planner's ages of pending payments
-- The caller lists the account in the set of known accounts before this runs: that set is in
-- another hash slot than the account's keys, and a payment recorded under an unlisted account
-- would never be swept.
-- ARGV[1] account   ARGV[2] reference_id   ARGV[3] initial state   ARGV[4] events maxlen
-- ARGV[5] number N of identity fields that must match an existing record (they come first)
-- ARGV[6..] field, value pairs to store (a value '$now' is replaced by the Redis time)
-- Returns {1, now} when recorded; {0, state, f1, v1, ...} with the stored identity fields when a
-- record already exists (nothing written).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local nstr = string.format('%.6f', now)

if redis.call('EXISTS', KEYS[1]) == 1 then
  local reply = {0, redis.call('HGET', KEYS[1], 'state')}
  local n = tonumber(ARGV[5])
  for i = 0, n - 1 do
    local field = ARGV[6 + 2 * i]
    table.insert(reply, field)
    table.insert(reply, redis.call('HGET', KEYS[1], field) or '')
  end
  return reply
end

local fields = {'account', ARGV[1], 'reference_id', ARGV[2], 'state', ARGV[3],
                'submitted_at', nstr, 'updated_at', nstr, 'next_at', nstr,
                'attempts', '0', 'polls', '0'}
for i = 6, #ARGV, 2 do
  table.insert(fields, ARGV[i])
  if ARGV[i + 1] == '$now' then
    table.insert(fields, nstr)
  else
    table.insert(fields, ARGV[i + 1])
  end
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[2])
if KEYS[5] then
  redis.call('ZADD', KEYS[5], now, ARGV[2])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
           'account', ARGV[1], 'reference_id', ARGV[2], 'from', '', 'to', ARGV[3], 'at', nstr)
return {1, nstr}
