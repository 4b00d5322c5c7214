-- observe.lua: learn from the anthropic-ratelimit-* headers of a response.
-- A lower limit the upstream announces is adopted (a higher one is capped at
-- the configured limit). A remaining below what sluice believes lowers the
-- bucket: sluice's bucket holds only `burst` of the upstream's per-minute
-- capacity, so the level matching the upstream's remaining R is
-- R - (limit - capacity).
-- KEYS[1] limiter state   KEYS[2] the last headers seen, as sent (for the
--   operators: limit and remaining per dimension, and when)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- ARGV[6..11] announced limit and remaining of requests, input tokens and
--   output tokens; -1 where a header was absent. Token remainings come
--   already lowered by the upstream's rounding (to the nearest 1,000).
-- ARGV[12..17] the same six values as the upstream sent them
-- ARGV[18] "1" when the upstream answered (the call began, or the upstream
--   refused the request itself): the group is healthy (see health_ok)
-- ARGV[19] wake channel   ARGV[20] moved channel
-- Reply: 1 when this answer ended an outage, else 0
local now = clock(ARGV[1])
local cfg = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local names = {'ar', 'ai', 'ao'}
for d = 1, 3 do
  local lim = tonumber(ARGV[4 + 2 * d])
  if lim > 0 then
    if lim < cfg[d] then
      redis.call('HSET', KEYS[1], names[d], lim)
    else
      redis.call('HDEL', KEYS[1], names[d])
    end
  end
end
local seen = {'rl', 'rr', 'il', 'ir', 'ol', 'or'}
local any = false
for n = 1, 6 do
  local v = tonumber(ARGV[11 + n])
  if v >= 0 then
    redis.call('HSET', KEYS[2], seen[n], v)
    any = true
  end
end
if any then redis.call('HSET', KEYS[2], 'at', now) end
local st = lim_load(KEYS[1], now, cfg)
local levels = {'r', 'i', 'o'}
local caps = {st.cr, st.ci, st.co}
local lims = {st.lr, st.li, st.lo}
for d = 1, 3 do
  local rem = tonumber(ARGV[5 + 2 * d])
  if rem >= 0 then
    local level = rem - (lims[d] - caps[d])
    local tolerance = 0.02 * lims[d]
    if d == 1 then tolerance = tolerance + 1 end
    if level + tolerance < st[levels[d]] then st[levels[d]] = level end
  end
end
local reopened = ARGV[18] == '1' and health_ok(st)
lim_save(st)
if reopened then
  redis.call('PUBLISH', ARGV[19], 'reopened')
  redis.call('PUBLISH', ARGV[20], 1)
  return 1
end
return 0
