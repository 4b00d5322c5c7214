-- lease_renew.lua: extend a held slot's lease (the holder's heartbeat).
-- KEYS[1] the group's lease set
-- ARGV[1] lease ms   ARGV[2] holder id
-- Reply: 1 if the lease was still held and is extended, 0 if it had expired
-- (the slot may already be someone else's: the holder should stop).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exp = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not exp or tonumber(exp) <= now then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
