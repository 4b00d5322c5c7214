-- cache.lua: what the beginning of an answer said about the prompt cache
-- (see the cache hash in prelude.lua), or that a call ended before its
-- answer began.
--   began     the answer began (message_start): its usage goes into the
--             group's cache figures per minute; when it read or wrote the
--             cache, every prefix of the job is cached for its lifetime
--             from now; when it did neither, its prefixes are not
--             cacheable (too short for the upstream) for ten minutes; no
--             job waits for them to be written any more
--   released  the call ended before its answer began: the job no longer
--             writes its prefixes, and jobs held for them may go
-- Jobs held for a prefix are woken (a dispatch round runs).
-- KEYS[1] the group's cache hash   KEYS[2] the job's record
-- KEYS[3] the group's use per minute
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] began | released
-- ARGV[4] input tokens   ARGV[5] cache creation tokens   ARGV[6] cache read tokens
-- ARGV[7] wake channel
-- Reply: how many holds it ended.
local now = clock(ARGV[1])
local id, what = ARGV[2], ARGV[3]
local input, created, read = tonumber(ARGV[4]) or 0, tonumber(ARGV[5]) or 0, tonumber(ARGV[6]) or 0
if what == 'began' then
  local minute = math.floor(now / 60000)
  redis.call('HINCRBY', KEYS[3], 'ct' .. minute, intstr(input + created + read))
  redis.call('HINCRBY', KEYS[3], 'cr' .. minute, intstr(read))
  redis.call('HINCRBY', KEYS[3], 'cc' .. minute, intstr(created))
  redis.call('HDEL', KEYS[3], 'ct' .. (minute - 10), 'cr' .. (minute - 10), 'cc' .. (minute - 10))
end
local ps = cache_prefixes(redis.call('HGET', KEYS[2], 'c_pre'))
local ended = 0
for _, p in ipairs(ps) do
  local w = redis.call('HGET', KEYS[1], 'w:' .. p.h)
  local wid = string.match(w or '', '^([^,]*),')
  if what == 'began' then
    if created + read > 0 then
      redis.call('HSET', KEYS[1], p.h, intstr(now + p.ttl))
      redis.call('HDEL', KEYS[1], 'n:' .. p.h)
    else
      redis.call('HSET', KEYS[1], 'n:' .. p.h, intstr(now + 600000))
    end
    if w and wid ~= '!' then
      redis.call('HDEL', KEYS[1], 'w:' .. p.h)
      ended = ended + 1
    end
  elseif wid == id then
    redis.call('HDEL', KEYS[1], 'w:' .. p.h)
    ended = ended + 1
  end
end
if ended > 0 then redis.call('PUBLISH', ARGV[7], 'cache') end
return ended
