-- Find events the stream's cap trimmed before a consumer group read them, count them, and move
-- the group past them (so they are reported once), keeping its read counter right.
--
-- KEYS[1] events stream   ARGV[1] group
-- Returns {trimmed, lag}: trimmed = events trimmed unread (-1: some, Redis cannot count them),
-- lag = events in the stream the group has not read yet (after the move).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
local function map(flat)
  local m = {}
  for i = 1, #flat, 2 do
    m[flat[i]] = flat[i + 1]
  end
  return m
end
local s = map(redis.call('XINFO', 'STREAM', KEYS[1]))
local g = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local candidate = map(flat)
  if candidate['name'] == ARGV[1] then
    g = candidate
  end
end
if not g then
  return {0, 0}
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local added = tonumber(s['entries-added'])
local length = tonumber(s['length'])
local read = tonumber(g['entries-read'])
local first = s['first-entry']
local delivered = g['last-delivered-id']
if length == 0 or not first then
  return {0, 0}
end
local first_id = first[1]
-- Everything up to first_id's predecessor is gone; the group read up to `delivered`.
local ms, seq = parse(first_id)
local before
if seq > 0 then
  before = string.format('%d-%d', ms, seq - 1)
elseif ms > 0 then
  before = string.format('%d-18446744073709551615', ms - 1)
else
  before = '0-0'
end
if less(delivered, before) then
  local trimmed = -1
  if read then
    trimmed = (added - read) - length
  end
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], before, 'ENTRIESREAD', added - length)
  if trimmed == 0 then
    -- Nothing was lost: the group had read everything up to the trim.
    return {0, length}
  end
  return {trimmed, length}
end
local lag = tonumber(g['lag'])
if not lag then
  lag = read and (added - read) or 0
end
return {0, lag}
