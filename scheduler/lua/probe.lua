-- probe.lua: a jobless probe of a group in outage failed (see dispatch.lua,
-- state "probe"): the next probe goes later, as after a failed job probe.
-- A success is reported with observe.lua instead, which ends the outage.
-- KEYS[1] limiter state
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] the outage rule, JSON (see
--   health_fail)
-- Reply: 1 when the probe was the group's current one, else 0
local now = clock(ARGV[1])
local h = cjson.decode(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'down', 'probe', 'probe_n')
if not tonumber(v[1]) or not string.match(v[2] or '', '^#%d+$') then return 0 end
local n = (tonumber(v[3]) or 0) + 1
redis.call('HSET', KEYS[1], 'probe', '', 'probe_n', n, 'probe_at', now + probe_delay(h, n))
return 1
