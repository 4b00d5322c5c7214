-- prelude.lua: shared by every scheduler script (prepended to each).
--
-- A group's limiter state lives in one hash (KEY lim):
--   r, i, o      levels of the request, input-token and output-token buckets
--   ts           when the levels were last brought up to date (ms)
--   ar, ai, ao   limits the upstream announced lower than the configured ones
--   frozen       no dispatch before this time (ms): an upstream 429
--   factor, f_at the pace factor (0.25..1) after a burst of 529s, and when it
--                was last set; it recovers linearly to 1 over a minute
--   n529, l529   529s seen in the current 10 s window, and the last one (ms)
--   dur          EWMA of upstream call duration (ms): measured throughput
--   oratio       EWMA of actual output / max_tokens
-- Buckets refill at limit/60 s, the upstream's own rate, so sluice never
-- runs ahead of it. The request bucket holds `burst` of the per-minute limit
-- (at least 1), so requests are paced, not fired in bursts. The token
-- buckets hold 95% of the per-minute limit, like the upstream's (which holds
-- all of it) less a margin for estimation error: a max_tokens reservation
-- must fit in them, and is mostly refunded when the call ends. A bucket may
-- go negative: a job larger than the bucket goes when the bucket is full, and
-- the debt refills at the same rate.

-- TOKEN_SHARE is the part of a per-minute token limit a bucket holds.
local TOKEN_SHARE = 0.95

local function clock(arg)
  local n = tonumber(arg)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(v, def)
  local n = tonumber(v)
  if n == nil then return def end
  return n
end

-- lim_load reads the group's limiter state, brought up to time now.
-- cfg = {rpm, itpm, otpm, burst_ms}
local function lim_load(key, now, cfg)
  local h = redis.call('HMGET', key, 'r', 'i', 'o', 'ts', 'ar', 'ai', 'ao',
    'frozen', 'factor', 'f_at', 'n529', 'l529', 'dur', 'oratio')
  local st = {key = key}
  st.lr = math.min(cfg[1], num(h[5], cfg[1]))
  st.li = math.min(cfg[2], num(h[6], cfg[2]))
  st.lo = math.min(cfg[3], num(h[7], cfg[3]))
  st.cr = math.max(1, st.lr * cfg[4] / 60000)
  st.ci = math.max(1, st.li * TOKEN_SHARE)
  st.co = math.max(1, st.lo * TOKEN_SHARE)
  st.frozen = num(h[8], 0)
  local factor, f_at = num(h[9], 1), num(h[10], 0)
  st.factor = math.min(1, factor + math.max(0, now - f_at) / 60000)
  st.n529, st.l529 = num(h[11], 0), num(h[12], 0)
  st.dur, st.oratio = num(h[13], 0), num(h[14], 1)
  st.rr = st.lr / 60000 * st.factor
  st.ri = st.li / 60000 * st.factor
  st.ro = st.lo / 60000 * st.factor
  local ts = num(h[4], now)
  local dt = math.max(0, now - ts)
  -- No refill while frozen: the upstream told us to stop.
  if st.frozen > ts then dt = math.max(0, now - math.max(ts, st.frozen)) end
  st.r = math.min(st.cr, num(h[1], st.cr) + st.rr * dt)
  st.i = math.min(st.ci, num(h[2], st.ci) + st.ri * dt)
  st.o = math.min(st.co, num(h[3], st.co) + st.ro * dt)
  st.now = now
  return st
end

local function lim_save(st)
  redis.call('HSET', st.key, 'r', st.r, 'i', st.i, 'o', st.o, 'ts', st.now)
end

-- need is what a cost must find in a bucket: all of it, or a full bucket
-- when the cost is larger than the bucket can ever hold.
local function need(cost, cap)
  return math.min(cost, cap)
end

-- wait_ms is how long until level reaches n at rate (per ms).
local function wait_ms(n, level, rate)
  if level >= n then return 0 end
  if rate <= 0 then return 60000 end
  return (n - level) / rate
end

-- eta_seconds: how long until the job at position pos (1 = next) starts,
-- from the requests and tokens ahead of it (pos jobs of the group's average
-- queued cost, itself included), the buckets' levels and refill rates, a
-- freeze, and the measured throughput (max_conc calls of `dur` ms each).
local function eta_seconds(st, pos, avg_in, avg_out, max_conc)
  local t = math.max(
    wait_ms(pos, st.r, st.rr),
    wait_ms(pos * avg_in, st.i, st.ri),
    wait_ms(pos * avg_out * st.oratio, st.o, st.ro))
  if st.frozen > st.now then t = t + (st.frozen - st.now) end
  if st.dur > 0 and max_conc > 0 then
    t = math.max(t, math.floor((pos - 1) / max_conc) * st.dur)
  end
  return math.floor(t / 1000 + 0.5)
end

-- queue_avgs: the average estimated input and output of a queued job.
local function queue_avgs(totals_key)
  local t = redis.call('HMGET', totals_key, 'n', 'in', 'out')
  local n = num(t[1], 0)
  if n <= 0 then return 0, 0 end
  return num(t[2], 0) / n, num(t[3], 0) / n
end

local function split2(s)
  local a, b = string.match(s, '^([^,]*),(.*)$')
  return tonumber(a), tonumber(b)
end

local function split3(s)
  local a, b, c = string.match(s, '^([^,]*),([^,]*),(.*)$')
  return tonumber(a), tonumber(b), tonumber(c)
end

-- fq_leave takes a job out of its group's queue (order, deadlines, its cost
-- and the queue totals); it reports whether the job was in the order.
local function fq_leave(order, costs, totals, deadlines, member)
  redis.call('ZREM', deadlines, member)
  if redis.call('ZREM', order, member) == 0 then return false end
  local cost = redis.call('HGET', costs, member) or '0,0'
  redis.call('HDEL', costs, member)
  local cin, cout = split2(cost)
  redis.call('HINCRBY', totals, 'n', -1)
  redis.call('HINCRBY', totals, 'in', -cin)
  redis.call('HINCRBY', totals, 'out', -cout)
  return true
end
