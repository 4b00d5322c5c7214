-- renew.lua: a worker's heartbeat on its job's concurrency lease.
-- KEYS[1] leases   ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] lease ms
-- Reply: 1 if the lease was live and is extended; 0 if it had expired (the
-- job may already be queued again: the holder must stop).
local now = clock(ARGV[1])
local exp = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not exp or tonumber(exp) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return 1
