-- settle.lua: close a job's reservation, exactly once: give back what the
-- upstream did not use (or take more, if it used more), release the job's
-- concurrency lease and wake the dispatchers. A second call finds no
-- reservation and changes nothing.
-- KEYS[1] limiter state   KEYS[2] reservations   KEYS[3] leases
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id
-- ARGV[3..5] what the upstream counted: requests, input tokens, output tokens
-- ARGV[6..9] rpm, input_tpm, output_tpm, burst ms
-- ARGV[10] call duration ms (0 = the call did not complete: not measured)
-- ARGV[11] wake channel
-- Reply: 1 if a reservation was settled, 0 if there was none.
local now = clock(ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local res = redis.call('HGET', KEYS[2], ARGV[2])
if not res then
  redis.call('PUBLISH', ARGV[11], 'settled')
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[2])
local rr, ri, ro = split3(res)
local ar, ai, ao = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local st = lim_load(KEYS[1], now, {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])})
st.r = math.min(st.cr, st.r + rr - ar)
st.i = math.min(st.ci, st.i + ri - ai)
st.o = math.min(st.co, st.o + ro - ao)
lim_save(st)
local dur = tonumber(ARGV[10])
if dur > 0 then
  local d = st.dur
  if d <= 0 then d = dur else d = 0.8 * d + 0.2 * dur end
  local ratio = 1
  if ro > 0 then ratio = math.min(1, ao / ro) end
  redis.call('HSET', KEYS[1], 'dur', d, 'oratio', 0.8 * st.oratio + 0.2 * ratio)
end
redis.call('PUBLISH', ARGV[11], 'settled')
return 1
