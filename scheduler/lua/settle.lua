-- settle.lua: close a job's reservations, each exactly once.
-- The limiter's (one per dispatch): give back what the upstream did not
-- use, or take more if it used more; release the job's concurrency lease
-- and wake the dispatchers. The user's quota (one per job, settled when the
-- job ends, with final): the same against the quota buckets. A second call
-- finds no reservation and changes nothing.
-- KEYS[1] limiter state   KEYS[2] reservations   KEYS[3] leases
-- KEYS[4] job hash        KEYS[5] user quota
-- KEYS[6] the group's use per minute (tokens as settled: "i<minute>", "o<minute>")
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id
-- ARGV[3..5] what the upstream counted: requests, input tokens, output tokens
-- ARGV[6..9] rpm, input_tpm, output_tpm, burst ms
-- ARGV[10] call duration ms (0 = the call did not complete: not measured)
-- ARGV[11] wake channel
-- ARGV[12] "1" when the job has ended: settle the quota too
-- ARGV[13] requests per hour   ARGV[14] tokens per hour (0 = unlimited)
-- Reply: {limiter settled 0|1, quota settled 0|1}
local now = clock(ARGV[1])
local ar, ai, ao = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREM', KEYS[3], ARGV[2])
local out = {0, 0}
local res = redis.call('HGET', KEYS[2], ARGV[2])
if res then
  redis.call('HDEL', KEYS[2], ARGV[2])
  local rr, ri, ro = split3(res)
  local st = lim_load(KEYS[1], now, {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])})
  st.r = math.min(st.cr, st.r + rr - ar)
  st.i = math.min(st.ci, st.i + ri - ai)
  st.o = math.min(st.co, st.o + ro - ao)
  lim_save(st)
  if ai > 0 or ao > 0 then
    local minute = math.floor(now / 60000)
    redis.call('HINCRBY', KEYS[6], 'i' .. minute, ai)
    redis.call('HINCRBY', KEYS[6], 'o' .. minute, ao)
    redis.call('HDEL', KEYS[6], 'i' .. (minute - 5), 'o' .. (minute - 5))
  end
  local dur = tonumber(ARGV[10])
  if dur > 0 then
    local d = st.dur
    if d <= 0 then d = dur else d = 0.8 * d + 0.2 * dur end
    local ratio = 1
    if ro > 0 then ratio = math.min(1, ao / ro) end
    redis.call('HSET', KEYS[1], 'dur', d, 'oratio', 0.8 * st.oratio + 0.2 * ratio)
  end
  out[1] = 1
end
if ARGV[12] == '1' then
  local q = redis.call('HMGET', KEYS[4], 'q_req', 'q_tok')
  local qreq, qtok = tonumber(q[1]), tonumber(q[2])
  if qreq or qtok then
    redis.call('HDEL', KEYS[4], 'q_req', 'q_tok')
    local rph, tph = tonumber(ARGV[13]), tonumber(ARGV[14])
    local h = redis.call('HMGET', KEYS[5], 'r', 't', 'ts')
    if h[3] then
      local dt = math.max(0, now - tonumber(h[3]))
      local r, t = num(h[1], rph), num(h[2], tph)
      if rph > 0 then r = math.min(rph, r + rph / 3600000 * dt + (qreq or 0) - math.min(ar, 1)) end
      if tph > 0 then t = math.min(tph, t + tph / 3600000 * dt + (qtok or 0) - (ai + ao)) end
      redis.call('HSET', KEYS[5], 'r', r, 't', t, 'ts', now)
    end
    out[2] = 1
  end
end
redis.call('PUBLISH', ARGV[11], 'settled')
return out
