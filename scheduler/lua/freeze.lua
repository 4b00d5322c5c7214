-- freeze.lua: react to the upstream pushing back.
--   "429"  a rate limit with retry-after: no dispatch from any process until
--          then, and the buckets empty, so sending resumes paced.
--   "ramp" ramp_limit_exceeded: as 429, and the pace factor halves.
--   "529"  overloaded: three within 10 s halve the pace factor (at least
--          0.25; it recovers to 1 over a minute) and pause for retry-after.
-- KEYS[1] limiter state
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] kind   ARGV[3] retry-after ms
-- ARGV[4..7] rpm, input_tpm, output_tpm, burst ms
-- Reply: the time (ms) until which the group is frozen.
local now = clock(ARGV[1])
local kind, ra = ARGV[2], tonumber(ARGV[3])
local st = lim_load(KEYS[1], now, {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])})
local frozen = st.frozen
local function slow()
  redis.call('HSET', KEYS[1], 'factor', math.max(0.25, st.factor * 0.5), 'f_at', now)
end
if kind == '429' or kind == 'ramp' then
  frozen = math.max(frozen, now + ra)
  st.r, st.i, st.o = math.min(st.r, 0), math.min(st.i, 0), math.min(st.o, 0)
  if kind == 'ramp' then slow() end
elseif kind == '529' then
  local n = 1
  if now - st.l529 < 10000 then n = st.n529 + 1 end
  if n >= 3 then
    slow()
    frozen = math.max(frozen, now + ra)
    n = 0
  end
  redis.call('HSET', KEYS[1], 'n529', n, 'l529', now)
end
lim_save(st)
redis.call('HSET', KEYS[1], 'frozen', frozen)
return frozen
