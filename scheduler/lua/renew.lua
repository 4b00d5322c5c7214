-- renew.lua: a worker's heartbeat on its job's concurrency lease.
-- The lease is lost only when a dispatcher took it back (it found it
-- expired and queued the job again) and so the job moved to a newer
-- dispatch. A lease past its time that nobody took back yet is renewed: its
-- holder was only slow to say so (Redis was away, or paused).
-- KEYS[1] leases   KEYS[2] job hash
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] lease ms
-- ARGV[4] the holder's dispatch
-- Reply: 1 if the lease is held and extended; 0 if it was taken back (the
-- job may be running elsewhere: the holder must stop).
local now = clock(ARGV[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
if redis.call('HGET', KEYS[2], 'dispatch') ~= ARGV[4] then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return 1
