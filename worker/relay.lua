-- Relay one account's outbox entries into the events stream, each exactly once (Redis Cluster).
--
-- KEYS[1] the events stream   KEYS[2] the relay's cursors (HASH account -> last entry id relayed)
-- ARGV[1] account   ARGV[2] the stream's maxlen (approximate trimming)
-- ARGV[3..] the outbox entries, oldest first: id, number of field/value pairs N, then N pairs
-- Entries not after the account's cursor were relayed already (a relay that died between this
-- script and the outbox's XDEL) and are skipped. Returns the number of entries appended.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local last = redis.call('HGET', KEYS[2], ARGV[1]) or '0-0'
local last_ms, last_seq = parse(last)
local appended = 0
local i = 3
while i <= #ARGV do
  local id = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local ms, seq = parse(id)
  if ms > last_ms or (ms == last_ms and seq > last_seq) then
    local fields = {}
    for j = i + 2, i + 1 + 2 * n do
      table.insert(fields, ARGV[j])
    end
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
    last, last_ms, last_seq = id, ms, seq
    appended = appended + 1
  end
  i = i + 2 + 2 * n
end
redis.call('HSET', KEYS[2], ARGV[1], last)
return appended
