-- Delete a key only if it still holds the value the caller knows: the owner-only release of the
-- token-renewal lock, and the invalidation of a cached token that is still the one that got a 401
-- (a newer token written by another process in the meantime must survive).
--
-- KEYS[1]  the key (a token-renewal lock, or a cached access token)
-- ARGV[1]  the value the caller expects it to hold (its lock owner id, or the token it used)
-- returns  1 when the key held ARGV[1] and was deleted, 0 otherwise (absent, expired, changed)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
