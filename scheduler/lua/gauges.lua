-- gauges.lua: a group's live figures for metrics and the dashboard. Reads
-- only: the limiter's levels are brought up to now but not saved.
-- KEYS[1] limiter state   KEYS[2] leases   KEYS[3] order
-- KEYS[4] waiting users   KEYS[5] headers seen   KEYS[6] use per minute
--   (dispatches, and input and output tokens settled)
-- KEYS[7] batch line   KEYS[8] jobs in batches (lua/batch.lua)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- Reply: a JSON object (see scheduler.Gauges for the names); the last
-- headers seen are absent when never seen.
local now = clock(ARGV[1])
local st = lim_load(KEYS[1], now, {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])})
local minute = math.floor(now / 60000)
local rate = redis.call('HMGET', KEYS[6], minute, minute - 1, 'i' .. minute, 'i' .. (minute - 1), 'o' .. minute, 'o' .. (minute - 1),
  'b' .. minute, 'b' .. (minute - 1))
local h = redis.call('HMGET', KEYS[1], 'probe_at', 'probe_n', 'outages', 'probe')
local out = {
  now = now, levels = {st.r, st.i, st.o}, caps = {st.cr, st.ci, st.co}, limits = {st.lr, st.li, st.lo},
  frozen = st.frozen, factor = st.factor,
  leases = redis.call('ZCARD', KEYS[2]), queued = redis.call('ZCARD', KEYS[3]), users = redis.call('HLEN', KEYS[4]),
  dispatched = {num(rate[1], 0), num(rate[2], 0)},
  dispatched_b = {num(rate[7], 0), num(rate[8], 0)},
  queued_b = redis.call('ZCOUNT', KEYS[3], BG, '+inf'),
  input = {num(rate[3], 0), num(rate[4], 0)}, output = {num(rate[5], 0), num(rate[6], 0)},
  down = st.down, probe_at = num(h[1], 0), probes = num(h[2], 0), outages = num(h[3], 0),
  probing = (h[4] or '') ~= '',
  batch_waiting = redis.call('ZCARD', KEYS[7]), in_batches = redis.call('ZCARD', KEYS[8]),
  seen = {},
}
local names = {'rl', 'rr', 'il', 'ir', 'ol', 'or', 'at'}
local seen = redis.call('HMGET', KEYS[5], unpack(names))
for i = 1, 7 do
  if seen[i] then out.seen[names[i]] = tonumber(seen[i]) end
end
return cjson.encode(out)
