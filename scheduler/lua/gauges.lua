-- gauges.lua: a group's live figures for metrics and the dashboard. Reads
-- only: the limiter's levels are brought up to now but not saved.
-- KEYS[1] limiter state   KEYS[2] leases   KEYS[3] order
-- KEYS[4] waiting users   KEYS[5] headers seen   KEYS[6] use per minute
--   (dispatches, and input and output tokens settled)
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- Reply (numbers as strings, Lua would cut fractions):
--   {now, r, cr, i, ci, o, co, lr, li, lo, frozen, factor, leases, queued,
--    users, this minute's dispatches, last minute's, seen rl, rr, il, ir, ol,
--    or, seen at, this minute's input tokens, last minute's, this minute's
--    output tokens, last minute's}   (seen values "" when never seen)
local now = clock(ARGV[1])
local st = lim_load(KEYS[1], now, {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])})
local minute = math.floor(now / 60000)
local rate = redis.call('HMGET', KEYS[6], minute, minute - 1, 'i' .. minute, 'i' .. (minute - 1), 'o' .. minute, 'o' .. (minute - 1))
local out = {now, st.r, st.cr, st.i, st.ci, st.o, st.co, st.lr, st.li, st.lo, st.frozen, st.factor,
  redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]), redis.call('HLEN', KEYS[4]),
  num(rate[1], 0), num(rate[2], 0)}
for i = 1, #out do out[i] = tostring(out[i]) end
local seen = redis.call('HMGET', KEYS[5], 'rl', 'rr', 'il', 'ir', 'ol', 'or', 'at')
for i = 1, 7 do out[#out + 1] = seen[i] or '' end
for i = 3, 6 do out[#out + 1] = tostring(num(rate[i], 0)) end
return out
