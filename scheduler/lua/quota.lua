-- quota.lua: a user's hourly quotas (prelude.lua's quota_level), kept in
-- the user's own slot: every model group's admission charges the same
-- buckets, so they cannot live in any one group's slot. In a cluster a
-- charge is a step of its own, before the job's admission, given back when
-- admission refuses; on one Redis admit.lua charges them in its own step.
--
-- KEYS[1] the user's quota (hash: r, t, ts, x)
-- KEYS[2] the job's settlement mark (a give counts once per job)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] "take" | "give"
-- ARGV[3] requests per hour   ARGV[4] tokens per hour (0 = unlimited)
-- take: ARGV[5] tokens to reserve (the request is 1)
--   Reply: name, value pairs (scheduler's quotaTakeOut): {"outcome", "ok",
--   "quota_remaining", requests remaining (-1: unlimited), "quota_reset",
--   seconds until full} or quota_refusal's {"outcome", "quota", ...}
-- give: ARGV[5] requests reserved   ARGV[6] tokens reserved
--       ARGV[7] requests used (0|1)   ARGV[8] tokens used
--   The buckets get back what was reserved and not used, once per job
--   (KEYS[2] remembers). Reply 1, or 0 when it was given already.
local now = clock(ARGV[1])
local rph, tph = tonumber(ARGV[3]), tonumber(ARGV[4])
local r, t, exists, renew = quota_level(KEYS[1], now, rph, tph)

if ARGV[2] == 'give' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 7200) then return 0 end
  if not exists then return 1 end -- the buckets are full (or were lost): nothing to give back
  if rph > 0 then r = math.min(rph, r + tonumber(ARGV[5]) - math.min(tonumber(ARGV[7]), 1)) end
  if tph > 0 then t = math.min(tph, t + tonumber(ARGV[6]) - tonumber(ARGV[8])) end
  quota_save(KEYS[1], now, r, t, renew)
  return 1
end

local cost = tonumber(ARGV[5])
local refusal = quota_refusal(r, t, rph, tph, cost)
if refusal then return refusal end
local remaining, reset = quota_take(KEYS[1], now, r, t, rph, tph, cost, renew)
return {'outcome', 'ok', 'quota_remaining', remaining, 'quota_reset', reset}
