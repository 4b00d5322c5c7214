-- requeue.lua: put a dispatched job back in its group's queue at its
-- original start tag (so it goes first when due): a retry after a failed
-- attempt, or a call handed back when its worker stops. Its lease is
-- released. Settle its reservation first, unless the call may have reached
-- the upstream and the next dispatch should reuse it (a hand-back).
-- KEYS[1] delayed   KEYS[2] delayed tags   KEYS[3] leases
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] queue member
-- ARGV[4] start tag   ARGV[5] "input,output" cost   ARGV[6] delay ms
-- ARGV[7] wake channel
-- Reply: the time (ms) the job is due.
local now = clock(ARGV[1])
local due = now + tonumber(ARGV[6])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[1], due, ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4] .. ';' .. ARGV[5])
redis.call('PUBLISH', ARGV[7], 'requeued')
return due
