-- Move a payment from one of the allowed states to a new one, atomically, and schedule its
-- next step (or none). Moves only forward: the caller names the allowed source states.
--
-- KEYS[1] record (hash)   KEYS[2] inflight:create   KEYS[3] inflight:track
-- KEYS[4] due:create      KEYS[5] due:track         KEYS[6] events stream
-- KEYS[7] set of the target state
-- KEYS[8] pending:age (ZSET ref -> created_at of each pending payment: the planner's ages)
-- KEYS[9] not-before of scheduled tracks (ZSET ref -> earliest time an early pull may run it)
-- KEYS[10] held tracks (ZSET ref -> due time of a track that holds a rate-limit slot)
-- KEYS[11] held creates (the same, for creates)
-- KEYS[12..] sets of the allowed source states, in the order of ARGV[3]
-- ARGV[1] reference_id
-- ARGV[2] target state
-- ARGV[3] allowed source states, comma separated (same order as KEYS[12..])
-- ARGV[4] next step: 'create', 'track' or '' (none: the payment leaves the schedule)
-- ARGV[5] delay of the next step in seconds from now (Redis clock)
-- ARGV[6] events maxlen
-- ARGV[7] guard field ('' for none)   ARGV[8] value the guard field must hold ('' = unset)
-- ARGV[9] 1 if the state set counts as final (stamp terminal_at), else 0
-- ARGV[10] number N of field increments
-- ARGV[11] for a next track: seconds from now before which no early pull may run it ('' for
--          never before its due time; 'held' when it holds a rate-limit slot: due at its
--          delay whatever the poll pace, never pulled); for a next create: 'held' when it
--          holds a slot (due at its delay whatever the creates' pace), else ''.
-- then N pairs (field, amount), then field, value pairs to set; a value '$now' or '$now+S' is replaced by the Redis time (+S)
-- Returns {1, previous state, now, submitted_at, polls, attempts} when moved;
--         {0, current state} when the state (or the guard) did not allow it; {-1} when no record.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local nstr = string.format('%.6f', now)

local current = redis.call('HGET', KEYS[1], 'state')
if not current then
  return {-1}
end
local source_index = nil
local i = 0
for state in string.gmatch(ARGV[3], '[^,]+') do
  i = i + 1
  if state == current then
    source_index = i
  end
end
if not source_index then
  return {0, current}
end
if ARGV[7] ~= '' then
  local held = redis.call('HGET', KEYS[1], ARGV[7]) or ''
  if held ~= ARGV[8] then
    return {0, current}
  end
end

local ref = ARGV[1]
local target = ARGV[2]
local updates = {'state', target, 'updated_at', nstr}
local n_incr = tonumber(ARGV[10])
local pos = 12
for _ = 1, n_incr do
  redis.call('HINCRBY', KEYS[1], ARGV[pos], ARGV[pos + 1])
  pos = pos + 2
end
while pos <= #ARGV do
  local value = ARGV[pos + 1]
  if string.sub(value, 1, 4) == '$now' then
    local offset = tonumber(string.sub(value, 6)) or 0
    value = string.format('%.6f', now + offset)
  end
  table.insert(updates, ARGV[pos])
  table.insert(updates, value)
  pos = pos + 2
end
if ARGV[9] == '1' and current ~= target then
  table.insert(updates, 'terminal_at')
  table.insert(updates, nstr)
end

-- Schedule: the step just run is no longer in flight; the next one (if any) is due.
redis.call('ZREM', KEYS[2], ref)
redis.call('ZREM', KEYS[3], ref)
redis.call('ZREM', KEYS[9], ref)
redis.call('ZREM', KEYS[10], ref)
redis.call('ZREM', KEYS[11], ref)
local step = ARGV[4]
if step == 'create' then
  local at = now + tonumber(ARGV[5])
  redis.call('ZADD', KEYS[4], at, ref)
  redis.call('ZREM', KEYS[5], ref)
  if ARGV[11] == 'held' then
    redis.call('ZADD', KEYS[11], at, ref)
  end
  table.insert(updates, 'next_at')
  table.insert(updates, string.format('%.6f', at))
elseif step == 'track' then
  local at = now + tonumber(ARGV[5])
  redis.call('ZADD', KEYS[5], at, ref)
  redis.call('ZREM', KEYS[4], ref)
  if ARGV[11] == 'held' then
    redis.call('ZADD', KEYS[10], at, ref)
  elseif ARGV[11] ~= '' then
    redis.call('ZADD', KEYS[9], now + tonumber(ARGV[11]), ref)
  end
  table.insert(updates, 'next_at')
  table.insert(updates, string.format('%.6f', at))
else
  redis.call('ZREM', KEYS[4], ref)
  redis.call('ZREM', KEYS[5], ref)
  table.insert(updates, 'next_at')
  table.insert(updates, '')
end
redis.call('HSET', KEYS[1], unpack(updates))

if current ~= target then
  redis.call('SREM', KEYS[11 + source_index], ref)
  redis.call('SADD', KEYS[7], ref)
  if target == 'pending' then
    local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or '') or now
    redis.call('ZADD', KEYS[8], created, ref)
  elseif current == 'pending' then
    redis.call('ZREM', KEYS[8], ref)
  end
  local account = redis.call('HGET', KEYS[1], 'account')
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[6], '*',
             'account', account, 'reference_id', ref, 'from', current, 'to', target, 'at', nstr,
             'payment_id', redis.call('HGET', KEYS[1], 'payment_id') or '',
             'error', redis.call('HGET', KEYS[1], 'last_error') or '')
  -- For waiters (worker.wait_for, Keys.changes): the payment key's own channel; nothing is
  -- kept, so a waiter subscribes before it reads the record.
  redis.call('PUBLISH', KEYS[1] .. ':changed', target)
end
return {1, current, nstr, redis.call('HGET', KEYS[1], 'submitted_at') or '',
        redis.call('HGET', KEYS[1], 'polls') or '0', redis.call('HGET', KEYS[1], 'attempts') or '0'}
