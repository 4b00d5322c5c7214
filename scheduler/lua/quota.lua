-- quota.lua: a user's hourly quotas (token buckets of the hourly figures,
-- refilled continuously), kept in the user's own slot: every model group's
-- admission charges the same buckets, so they cannot live in any one
-- group's slot, and a charge is a step of its own, before the job's
-- admission, given back when admission refuses.
--
-- KEYS[1] the user's quota (hash: r, t, ts)
-- KEYS[2] the job's settlement mark (a give counts once per job)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] "take" | "give"
-- ARGV[3] requests per hour   ARGV[4] tokens per hour (0 = unlimited)
-- take: ARGV[5] tokens to reserve (the request is 1)
--   Reply {"ok", requests remaining (-1: unlimited), seconds until full}
--      or {"quota", "requests"|"tokens", retry ms, limit, remaining}
-- give: ARGV[5] requests reserved   ARGV[6] tokens reserved
--       ARGV[7] requests used (0|1)   ARGV[8] tokens used
--   The buckets get back what was reserved and not used, once per job
--   (KEYS[2] remembers). Reply 1, or 0 when it was given already.
local now = clock(ARGV[1])
local rph, tph = tonumber(ARGV[3]), tonumber(ARGV[4])
local q = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local dt = math.max(0, now - num(q[3], now))
local r, t = 0, 0
if rph > 0 then r = math.min(rph, num(q[1], rph) + rph / 3600000 * dt) end
if tph > 0 then t = math.min(tph, num(q[2], tph) + tph / 3600000 * dt) end

if ARGV[2] == 'give' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 7200) then return 0 end
  if not q[3] then return 1 end -- the buckets are full (or were lost): nothing to give back
  if rph > 0 then r = math.min(rph, r + tonumber(ARGV[5]) - math.min(tonumber(ARGV[7]), 1)) end
  if tph > 0 then t = math.min(tph, t + tonumber(ARGV[6]) - tonumber(ARGV[8])) end
  redis.call('HSET', KEYS[1], 'r', r, 't', t, 'ts', now)
  redis.call('EXPIRE', KEYS[1], 7200)
  return 1
end

local cost = tonumber(ARGV[5])
if rph > 0 and r < 1 then
  return {'quota', 'requests', math.ceil((1 - r) / (rph / 3600000)), rph, math.floor(r)}
end
if tph > 0 and t < cost then
  return {'quota', 'tokens', math.ceil((cost - t) / (tph / 3600000)), tph, math.floor(t)}
end
local remaining, reset = -1, 0
if rph > 0 then
  r = r - 1
  remaining = math.floor(r)
  reset = math.ceil((rph - r) / (rph / 3600))
end
if tph > 0 then t = t - cost end
redis.call('HSET', KEYS[1], 'r', r, 't', t, 'ts', now)
redis.call('EXPIRE', KEYS[1], 7200)
return {'ok', remaining, reset}
