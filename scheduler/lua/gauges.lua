-- gauges.lua: a group's live figures for metrics and the dashboard. Reads
-- only: the limiter's levels are brought up to now but not saved.
-- KEYS[1] limiter state   KEYS[2] leases   KEYS[3] order
-- KEYS[4] waiting users   KEYS[5] headers seen   KEYS[6] use per minute
--   (dispatches, and input and output tokens settled)
-- KEYS[7] batch line   KEYS[8] jobs in batches (lua/batch.lua)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- Reply: name, value pairs (scheduler's gaugesOut); a figure that may hold
-- a fraction is a string (numstr). "seen" holds the last headers seen
-- (pairs; one never seen is absent).
local now = clock(ARGV[1])
local st = lim_load(KEYS[1], now, {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])})
local minute = math.floor(now / 60000)
local rate = redis.call('HMGET', KEYS[6], minute, minute - 1, 'i' .. minute, 'i' .. (minute - 1), 'o' .. minute, 'o' .. (minute - 1),
  'b' .. minute, 'b' .. (minute - 1))
local h = redis.call('HMGET', KEYS[1], 'probe_at', 'probe_n', 'outages', 'probe')
local names = {'rl', 'rr', 'il', 'ir', 'ol', 'or', 'at'}
local seen = {}
for i, v in ipairs(redis.call('HMGET', KEYS[5], unpack(names))) do
  v = tonumber(v)
  if v then
    seen[#seen + 1] = names[i]
    seen[#seen + 1] = v
  end
end
local function window(a, b)
  return {numstr(num(rate[a], 0)), numstr(num(rate[b], 0))}
end
return {
  'now', numstr(now),
  'levels', {numstr(st.r), numstr(st.i), numstr(st.o)},
  'caps', {numstr(st.cr), numstr(st.ci), numstr(st.co)},
  'limits', {numstr(st.lr), numstr(st.li), numstr(st.lo)},
  'frozen', numstr(st.frozen), 'factor', numstr(st.factor),
  'leases', redis.call('ZCARD', KEYS[2]), 'queued', redis.call('ZCARD', KEYS[3]), 'users', redis.call('HLEN', KEYS[4]),
  'dispatched', window(1, 2), 'dispatched_b', window(7, 8),
  'queued_b', redis.call('ZCOUNT', KEYS[3], BG, '+inf'),
  'input', window(3, 4), 'output', window(5, 6),
  'down', numstr(st.down), 'probe_at', numstr(num(h[1], 0)), 'probes', num(h[2], 0), 'outages', num(h[3], 0),
  'probing', (h[4] or '') ~= '' and 1 or 0,
  'batch_waiting', redis.call('ZCARD', KEYS[7]), 'in_batches', redis.call('ZCARD', KEYS[8]),
  'seen', seen,
}
