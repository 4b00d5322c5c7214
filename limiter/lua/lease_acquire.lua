-- lease_acquire.lua: take one of a model group's concurrency slots, fleet-wide.
-- A slot is a member of a sorted set scored by its expiry; a holder renews it
-- while it works, so the slot of a holder that died returns when its lease
-- runs out. Redis TIME is the clock, so every process agrees.
-- KEYS[1] the group's lease set
-- ARGV[1] max slots   ARGV[2] lease ms   ARGV[3] holder id
-- Reply: {1, 0} when taken (or already held), {0, ms until the earliest lease
-- expires} when full.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return {1, 0}
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
