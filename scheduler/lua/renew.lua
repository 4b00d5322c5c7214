-- renew.lua: a worker's heartbeat on its job's concurrency lease.
-- The lease is lost only when a dispatcher took it back (it found it
-- expired and queued the job again) and so the job moved to a newer
-- dispatch. A lease past its time that nobody took back yet is renewed: its
-- holder was only slow to say so (Redis was away, or paused).
-- A lease that is simply missing while the job is still at the holder's
-- dispatch, live and out of line (not back in the order, its retry queue or
-- the expiring set) was lost with its key (an eviction, a DEL), not taken
-- back: it is granted again, so the call goes on.
-- KEYS[1] leases   KEYS[2] job hash   KEYS[3] order   KEYS[4] delayed
-- KEYS[5] expiring
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] lease ms
-- ARGV[4] the holder's dispatch
-- A renewal also ends the grace a dispatcher gives a lease it found past
-- its time (dispatch.lua).
-- Reply: 1 if the lease is held and extended; 0 if it was taken back (the
-- job may be running elsewhere: the holder must stop).
local now = clock(ARGV[1])
local j = redis.call('HMGET', KEYS[2], 'dispatch', 'status', 'fq_member')
if j[1] ~= ARGV[4] then return 0 end
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  if j[2] ~= 'queued' and j[2] ~= 'running' then return 0 end
  if j[3] and (redis.call('ZSCORE', KEYS[3], j[3]) or redis.call('ZSCORE', KEYS[4], j[3])) then return 0 end
  if redis.call('ZSCORE', KEYS[5], ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('HDEL', KEYS[2], 'lease_grace') -- a dispatcher's grace, if any, is over: the holder lives
return 1
