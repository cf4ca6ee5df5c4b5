-- Claim an account's due steps for dispatch, within a budget of steps in flight, and put back
-- the steps whose lease ran out (a lost message or a killed worker): the durable timer and the
-- sweeper in one call.
--
-- KEYS[1] inflight:create   KEYS[2] inflight:track   KEYS[3] due:create   KEYS[4] due:track
-- KEYS[5] not-before of scheduled tracks (ZSET ref -> earliest time an early pull may run it)
-- KEYS[6] held tracks (ZSET ref -> due time of a track holding a rate-limit slot)
-- ARGV[1] budget: most steps of this account in flight at once
-- ARGV[2] lease in seconds: how long a dispatched step may take before it is due again
-- ARGV[3] most steps claimed by this call
-- ARGV[4] most tracks claimed by this call (the poll planner's pace), or -1 for none: then
--         tracks share the in-flight budget with creates, after them. With a pace, tracks have
--         their own in-flight budget (ARGV[1]) so that a create backlog cannot starve them,
--         and what the due ones leave of the pace goes to early pulls: the tracks due soonest
--         whose not-before has passed (a key with budget to spare spends it).
-- ARGV[5] (with a pace) seconds after its not-before that a scheduled track counts as starved:
--         it goes first, oldest first, whatever its due time (a due time planned under an
--         older, smaller budget must not starve it once the budget grows)
-- ARGV[6] (with a pace) 1 if spare pace pulls tracks forward, else 0
-- ARGV[7] (with a pace) most creates claimed by this call, or -1 for the in-flight budget only
-- KEYS[7] owners of started steps (HASH "<step>:<ref>" -> worker process, start_step.lua)
-- ARGV[8] worker processes that stopped heartbeating, comma separated ('' for none): the
--         steps they own go back to due now, whatever their lease (PAYPOLL_DEAD_AFTER)
-- KEYS[8] held creates (ZSET ref -> due time of a create holding a rate-limit slot)
-- ARGV[9] the worker process that claims (the sweeper's, which runs the tracks it claims itself
--         when it can: worker/local_steps.py): it owns the claimed tracks from now, so they go
--         back to due within PAYPOLL_DEAD_AFTER if it dies before a worker starts them ('' for
--         none). Creates go on the broker: unowned until a worker starts them.
-- KEYS[9] the account's event outbox (a stream, written instead of the events stream on Redis
--         Cluster; empty on one Redis): its length tells the sweeper to relay it
-- Returns {now, recovered, most_overdue_seconds, {create refs}, {track refs}, creates still due,
-- tracks still due, held tracks claimed (the first ones of the track refs, outside the pace),
-- held creates claimed (the first ones of the create refs, outside the creates' pace), events
-- waiting in the outbox}: the
-- claimed refs are now in flight with a lease of now + ARGV[2].
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local budget = tonumber(ARGV[1])
local lease_until = now + tonumber(ARGV[2])
local batch = tonumber(ARGV[3])

-- Leases that ran out go back to due, marked due now (they are overdue already).
local recovered = 0
for k = 1, 2 do
  local expired = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, batch)
  for _, ref in ipairs(expired) do
    redis.call('ZREM', KEYS[k], ref)
    redis.call('ZADD', KEYS[k + 2], now, ref)
    recovered = recovered + 1
  end
end

-- Steps owned by a dead process go back to due at once; owners of steps no longer in flight
-- (finished, or put back) are forgotten. The hash holds at most the steps in flight.
local dead = {}
for owner in string.gmatch(ARGV[8] or '', '[^,]+') do
  dead[owner] = true
end
local owners = redis.call('HGETALL', KEYS[7])
for i = 1, #owners, 2 do
  local field, owner = owners[i], owners[i + 1]
  local step, ref = string.match(field, '^(%a+):(.*)$')
  local k = (step == 'create') and 1 or 2
  if dead[owner] then
    if redis.call('ZREM', KEYS[k], ref) == 1 then
      redis.call('ZADD', KEYS[k + 2], now, ref)
      recovered = recovered + 1
    end
    redis.call('HDEL', KEYS[7], field)
  elseif not redis.call('ZSCORE', KEYS[k], ref) then
    redis.call('HDEL', KEYS[7], field)
  end
end

local overdue = 0
for k = 3, 4 do
  local first = redis.call('ZRANGE', KEYS[k], 0, 0, 'WITHSCORES')
  if first[2] and now - tonumber(first[2]) > overdue then
    overdue = now - tonumber(first[2])
  end
end

local claimed = {{}, {}}
local pace = tonumber(ARGV[4])
-- Held tracks first, outside the pace and the in-flight budget: their calls are booked, and
-- a hold claimed more than a second late is wasted (its slot passes unused).
-- Held creates the same way, outside the creates' pace: left behind a create backlog, their
-- slots went stale and each came back for a fresh one, so bookings outran the key's rate and
-- every create ended as a far slot (a burst of 100 submits made no create at all).
local function claim_held(held_key, due_key, inflight_key, into)
  local got = 0
  local ready = redis.call('ZRANGEBYSCORE', held_key, '-inf', now, 'LIMIT', 0, batch)
  for _, ref in ipairs(ready) do
    redis.call('ZREM', held_key, ref)
    if redis.call('ZREM', due_key, ref) == 1 then
      redis.call('ZADD', inflight_key, lease_until, ref)
      table.insert(into, ref)
      got = got + 1
    end
  end
  return got
end
local held = claim_held(KEYS[6], KEYS[4], KEYS[2], claimed[2])
local held_creates = claim_held(KEYS[8], KEYS[3], KEYS[1], claimed[1])
local tracks_inflight = redis.call('ZCARD', KEYS[2]) - held
local free = budget - (redis.call('ZCARD', KEYS[1]) - held_creates) - tracks_inflight
if free > batch then
  free = batch
end
local function claim(k, n)
  if n <= 0 then
    return 0
  end
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, n)
  for _, ref in ipairs(due) do
    redis.call('ZREM', KEYS[k], ref)
    redis.call('ZADD', KEYS[k - 2], lease_until, ref)
    table.insert(claimed[k - 2], ref)
  end
  if k == 4 and #due > 0 then
    redis.call('ZREM', KEYS[5], unpack(due))
    redis.call('ZREM', KEYS[6], unpack(due))
  end
  return #due
end
-- Starved tracks: up to n whose not-before is more than ARGV[5] seconds past, oldest first.
local function starved(n)
  if n <= 0 then
    return 0
  end
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[5]), 'LIMIT', 0, n)
  for _, ref in ipairs(old) do
    redis.call('ZREM', KEYS[5], ref)
    if redis.call('ZREM', KEYS[4], ref) == 1 then
      redis.call('ZADD', KEYS[2], lease_until, ref)
      table.insert(claimed[2], ref)
    end
  end
  return #old
end
-- Early pulls: up to n tracks not due yet, soonest first, whose not-before has passed. The
-- scan is bounded; a track without a not-before is never pulled (only its due time counts).
local function pull(n)
  if n <= 0 then
    return 0
  end
  local later = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf', 'LIMIT', 0, 4 * n + 8)
  -- (a held track has no not-before: it is never pulled)
  local got = 0
  for _, ref in ipairs(later) do
    local nb = redis.call('ZSCORE', KEYS[5], ref)
    if nb and tonumber(nb) <= now then
      redis.call('ZREM', KEYS[4], ref)
      redis.call('ZREM', KEYS[5], ref)
      redis.call('ZADD', KEYS[2], lease_until, ref)
      table.insert(claimed[2], ref)
      got = got + 1
      if got >= n then
        break
      end
    end
  end
  return got
end
-- Creates first: a tracking backlog must never delay new payments.
local creates = free
if pace >= 0 and tonumber(ARGV[7]) >= 0 and tonumber(ARGV[7]) < creates then
  creates = tonumber(ARGV[7])
end
free = free - claim(3, creates)
if pace < 0 then
  claim(4, free)
else
  local room = budget - tracks_inflight
  if room > batch then
    room = batch
  end
  if pace < room then
    room = pace
  end
  room = room - starved(room)
  room = room - claim(4, room)
  if ARGV[6] == '1' then
    pull(room)
  end
end
-- A fresh track is owned by the claiming process (ARGV[9]), any other fresh dispatch by nobody
-- until a worker starts it.
local claimer = ARGV[9] or ''
for k, step in ipairs({'create', 'track'}) do
  for _, ref in ipairs(claimed[k]) do
    if claimer ~= '' and step == 'track' then
      redis.call('HSET', KEYS[7], step .. ':' .. ref, claimer)
    else
      redis.call('HDEL', KEYS[7], step .. ':' .. ref)
    end
  end
end
return {string.format('%.6f', now), recovered, string.format('%.6f', overdue), claimed[1], claimed[2],
        redis.call('ZCOUNT', KEYS[3], '-inf', now), redis.call('ZCOUNT', KEYS[4], '-inf', now), held,
        held_creates, redis.call('XLEN', KEYS[9])}
