-- remove.lua: take a canceled job out of its group's queue at once, so the
-- jobs behind it move up (the dispatcher would also drop it when it reached
-- the head).
-- KEYS[1] order   KEYS[2] costs   KEYS[3] totals   KEYS[4] deadlines
-- KEYS[5] delayed   KEYS[6] delayed tags
-- ARGV[1] queue member   ARGV[2] wake channel   ARGV[3] moved channel
-- Reply: 1 if the job was waiting in the queue or for a retry, else 0.
local n = 0
if fq_leave(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1]) then n = 1 end
if redis.call('ZREM', KEYS[5], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[6], ARGV[1])
  n = 1
end
if n == 1 then
  redis.call('PUBLISH', ARGV[2], 'removed')
  redis.call('PUBLISH', ARGV[3], 1)
end
return n
