-- prelude.lua: shared by every scheduler script (prepended to each).
--
-- A group's limiter state lives in one hash (KEY lim):
--   r, i, o      levels of the request, input-token and output-token buckets
--   ts           when the levels were last brought up to date (ms)
--   ar, ai, ao   limits the upstream announced lower than the configured ones
--   xr, xi, xo   the account's limits (the Admin API's rate limits), if read
--   frozen       no dispatch before this time (ms): an upstream 429
--   factor, f_at the pace factor (0.25..1) after a burst of 529s, and when it
--                was last set; it recovers linearly to 1 over a minute
--   n529, l529   529s seen in the current 10 s window, and the last one (ms)
--   dur          EWMA of upstream call duration (ms): measured throughput
--   oratio       EWMA of actual output / max_tokens
--   oavg, odev, on   EWMA of answers' output tokens, of its deviation, and
--                how many answers taught them (expected_out)
--   round        Redis's clock at the last dispatch round (ms)
-- and the group's health (see health_fail):
--   down         since when the group is in outage (ms); absent: healthy
--   down_fail    when the outage has lasted too long: waiting jobs fail
--   probe        the job sent to test the upstream ("" = none in flight)
--   probe_at     when the next probe may go;  probe_n  probes failed so far
--   streak, streak_at   upstream failures in a row, and the last one's time
--   outages      how many outages the group has had
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

-- intstr formats a whole number for a Redis integer argument: a Lua number
-- would be sent as "%.14g", so 0 negated arrives as "-0" (and a large one
-- as "1e+15"), which HINCRBY, EXPIRE and the like refuse. A fraction is
-- truncated; nil, NaN and infinities (what a lost or mangled key can yield)
-- become 0.
local function intstr(n)
  n = tonumber(n)
  if not n or n ~= n or n == math.huge or n == -math.huge then return '0' end
  return string.format('%d', n)
end

-- Service classes. A group's one fair order holds both: an interactive
-- job's start tag is its fair-queuing tag, a background job's is BG plus
-- its own class's tag, so every background job sorts after every
-- interactive one and the head of the order is interactive whenever one
-- waits. Each class has its own V (interactive: the vtime key; background:
-- the vtime_b key, in BG's space) and its own finish tags (member: the
-- user key for interactive, the user key and "\0b" for background). A
-- background tag is above 2^49, where a double keeps quarter-token steps,
-- and %.14g (tostring) would lose digits: tags are written with tagstr.
local BG = 1e15

local function tagstr(x)
  return string.format('%.17g', x)
end

-- numstr is a number for a script's reply that may hold a fraction: Redis
-- truncates a Lua number in a reply to an integer, so it goes as a string,
-- with the 14 significant digits cjson would give it.
local function numstr(x)
  return string.format('%.14g', x)
end

-- finish_member is a user's member in the finish tags for its class.
local function finish_member(ukey, bg)
  if bg then return ukey .. '\0b' end
  return ukey
end

-- class_head is the score of the first job of a class in the order (nil
-- when none waits).
local function class_head(order, bg)
  local h
  if bg then
    h = redis.call('ZRANGEBYSCORE', order, BG, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  else
    h = redis.call('ZRANGEBYSCORE', order, '-inf', '(' .. tagstr(BG), 'WITHSCORES', 'LIMIT', 0, 1)
  end
  return tonumber(h[2])
end

local function num(v, def)
  local n = tonumber(v)
  if n == nil then return def end
  return n
end

-- renew_due says whether a key whose lifetime was last renewed at stamp
-- (ms, as stored: nil or false when never) is due again at now, period ms
-- later (a clock that went back renews too).
local function renew_due(stamp, now, period)
  stamp = tonumber(stamp)
  return not stamp or now - stamp >= period or now < stamp
end

-- lim_load reads the group's limiter state, brought up to time now.
-- cfg = {rpm, itpm, otpm, burst_ms}
local function lim_load(key, now, cfg)
  local h = redis.call('HMGET', key, 'r', 'i', 'o', 'ts', 'ar', 'ai', 'ao',
    'frozen', 'factor', 'f_at', 'n529', 'l529', 'dur', 'oratio', 'down', 'down_fail', 'oavg', 'odev', 'on',
    'xr', 'xi', 'xo')
  local st = {key = key}
  st.lr = math.min(cfg[1], num(h[5], cfg[1]), num(h[20], cfg[1]))
  st.li = math.min(cfg[2], num(h[6], cfg[2]), num(h[21], cfg[2]))
  st.lo = math.min(cfg[3], num(h[7], cfg[3]), num(h[22], cfg[3]))
  st.cr = math.max(1, st.lr * cfg[4] / 60000)
  st.ci = math.max(1, st.li * TOKEN_SHARE)
  st.co = math.max(1, st.lo * TOKEN_SHARE)
  st.frozen = num(h[8], 0)
  local factor, f_at = num(h[9], 1), num(h[10], 0)
  st.factor = math.min(1, factor + math.max(0, now - f_at) / 60000)
  st.n529, st.l529 = num(h[11], 0), num(h[12], 0)
  st.dur, st.oratio = num(h[13], 0), num(h[14], 1)
  st.down, st.down_fail = num(h[15], 0), num(h[16], 0)
  st.oavg, st.odev, st.on = num(h[17], 0), num(h[18], 0), num(h[19], 0)
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
-- -1 while the group is in outage: nobody can tell.
local function eta_seconds(st, pos, avg_in, avg_out, max_conc)
  if st.down > 0 then return -1 end
  -- A job's output: max_tokens times the output ratio, or, once the group
  -- has had answers, at most what an answer is expected to be.
  local per_out = avg_out * st.oratio
  if st.on > 0 then per_out = math.min(per_out, st.oavg + 2 * st.odev) end
  local t = math.max(
    wait_ms(pos, st.r, st.rr),
    wait_ms(pos * avg_in, st.i, st.ri),
    wait_ms(pos * per_out, st.o, st.ro))
  if st.frozen > st.now then t = t + (st.frozen - st.now) end
  if st.dur > 0 and max_conc > 0 then
    t = math.max(t, math.floor((pos - 1) / max_conc) * st.dur)
  end
  return math.floor(t / 1000 + 0.5)
end

-- queue_avgs: the average estimated input and output of a queued job.
-- Totals that drifted (a lost key) read as an empty queue, never as a
-- negative or undefined average.
local function queue_avgs(totals_key)
  local t = redis.call('HMGET', totals_key, 'n', 'in', 'out')
  local n = num(t[1], 0)
  if n <= 0 then return 0, 0 end
  return math.max(0, num(t[2], 0)) / n, math.max(0, num(t[3], 0)) / n
end

-- split2 reads a cost "in,out" (more fields after a second comma are
-- ignored); a missing or mangled part is nil.
local function split2(s)
  local a, b = string.match(s or '', '^([^,]*),([^,]*)')
  return tonumber(a), tonumber(b)
end

-- expected_out is the output a call is expected to produce, for a group
-- whose upstream counts output as it is produced: the mean of the group's
-- recent answers plus twice their mean deviation (a high quantile), at most
-- max_tokens; max_tokens itself until the group has had an answer.
local function expected_out(st, max_tokens)
  if st.on <= 0 then return max_tokens end
  return math.max(1, math.min(max_tokens, math.ceil(st.oavg + 2 * st.odev)))
end

local function split3(s)
  local a, b, c = string.match(s or '', '^([^,]*),([^,]*),([^,]*)')
  return tonumber(a), tonumber(b), tonumber(c)
end

-- totals_add adds a job (sign 1) or takes one away (-1) from a group's
-- queue totals (n jobs, their estimated input and output). Totals that
-- would go negative drifted (their key was lost while jobs were queued):
-- they are floored, and an empty count empties the hash; the dispatch
-- round rebuilds them from the costs when they disagree (dispatch.lua).
local function totals_add(totals, sign, cin, cout)
  local n = redis.call('HINCRBY', totals, 'n', intstr(sign))
  local i = redis.call('HINCRBY', totals, 'in', intstr(sign * (cin or 0)))
  local o = redis.call('HINCRBY', totals, 'out', intstr(sign * (cout or 0)))
  if n <= 0 then
    redis.call('DEL', totals)
  elseif i < 0 or o < 0 then
    redis.call('HSET', totals, 'in', intstr(math.max(0, i)), 'out', intstr(math.max(0, o)))
  end
end

-- fq_leave takes a job out of its group's queue (order, deadlines, its cost
-- and the queue totals); it reports whether the job was in the order. A
-- cost whose order entry was lost goes too.
local function fq_leave(order, costs, totals, deadlines, member)
  redis.call('ZREM', deadlines, member)
  if redis.call('ZREM', order, member) == 0 then
    redis.call('HDEL', costs, member)
    return false
  end
  local cost = redis.call('HGET', costs, member) or '0,0'
  redis.call('HDEL', costs, member)
  local cin, cout = split2(cost)
  totals_add(totals, -1, cin, cout)
  return true
end

-- counts_add moves a count of a hash (a user's queued or running jobs) by
-- delta, never below 0 (a count of 0 is no field): a count whose key was
-- lost while jobs were live reads low until those jobs end, then is exact
-- again.
local function counts_add(key, field, delta)
  local n = redis.call('HINCRBY', key, field, intstr(delta))
  if n <= 0 then redis.call('HDEL', key, field) end
  return math.max(0, n)
end

-- live_state is a job's entry in its group's live jobs (see dispatch.lua's
-- sweep): its status' initial and its owner's user key.
local function live_state(status, tenant, user)
  return string.sub(status, 1, 1) .. tenant .. '\0' .. user
end

-- probe_delay is the wait before an outage's probe after n failed ones:
-- h.probe_min doubling up to h.probe_max, times a jitter in [0.5, 1).
-- h = {after, window, probe_min, probe_max, max_outage, jitter}
local function probe_delay(h, n)
  local d = math.min(h.probe_max, h.probe_min * 2 ^ math.min(n, 30))
  return math.floor(d * (0.5 + 0.5 * h.jitter))
end

-- health_fail records a failure of the upstream's own (not the request's)
-- met by job id. h.after of them in a row, each within h.window of the
-- last and with no answer in between, put the group into outage:
-- dispatching stops and one probe at a time tests the upstream. A failed
-- probe sets the next one later. Reply: 'entered' (this failure began an
-- outage), 'down' (the group is in outage) or ''.
local function health_fail(key, now, h, id)
  local v = redis.call('HMGET', key, 'down', 'probe', 'probe_n', 'streak', 'streak_at')
  if tonumber(v[1]) then
    if v[2] == id then
      local n = (tonumber(v[3]) or 0) + 1
      redis.call('HSET', key, 'probe', '', 'probe_n', n, 'probe_at', now + probe_delay(h, n))
    end
    return 'down'
  end
  local streak = tonumber(v[4]) or 0
  if now - (tonumber(v[5]) or 0) > h.window then streak = 0 end
  streak = streak + 1
  if streak < h.after then
    redis.call('HSET', key, 'streak', streak, 'streak_at', now)
    return ''
  end
  redis.call('HSET', key, 'down', now, 'down_fail', now + h.max_outage, 'probe', '', 'probe_n', 0,
    'probe_at', now + probe_delay(h, 0), 'streak', 0, 'streak_at', now)
  redis.call('HINCRBY', key, 'outages', 1)
  return 'entered'
end

-- health_ok records an answer from the upstream (st from lim_load; the
-- caller saves it): the failure streak ends, and an outage is over, with
-- the buckets emptied so that dispatch resumes paced. Reply: true when it
-- ended an outage.
local function health_ok(st)
  local v = redis.call('HMGET', st.key, 'down', 'streak')
  if tonumber(v[2]) and tonumber(v[2]) > 0 then redis.call('HSET', st.key, 'streak', 0) end
  if not tonumber(v[1]) then return false end
  redis.call('HDEL', st.key, 'down', 'down_fail', 'probe', 'probe_at', 'probe_n')
  st.down, st.down_fail = 0, 0
  st.r, st.i, st.o = math.min(st.r, 0), math.min(st.i, 0), math.min(st.o, 0)
  return true
end

-- settle_limiter closes job id's limiter reservation, once: the buckets
-- get back what the upstream did not count of it (used = {requests, input,
-- output}), or give more when it counted more; the tokens go into the
-- group's use per minute (rate key), and a completed call's duration (dur
-- ms > 0) into the throughput estimate. It releases the job's lease.
-- Reply: true when there was a reservation.
local function settle_limiter(lim, reservations, leases, rate, now, cfg, id, used, dur)
  redis.call('ZREM', leases, id)
  local res = redis.call('HGET', reservations, id)
  if not res then return false end
  redis.call('HDEL', reservations, id)
  local ar, ai, ao = used[1] or 0, used[2] or 0, used[3] or 0
  local rr, ri, ro = split3(res)
  local rmax = tonumber(string.match(res, '^[^,]*,[^,]*,[^,]*,([^,]*)')) or ro
  rr, ri, ro = rr or 0, ri or 0, ro or 0
  local st = lim_load(lim, now, cfg)
  st.r = math.min(st.cr, st.r + rr - ar)
  st.i = math.min(st.ci, st.i + ri - ai)
  st.o = math.min(st.co, st.o + ro - ao)
  lim_save(st)
  if ai > 0 or ao > 0 then
    local minute = math.floor(now / 60000)
    redis.call('HINCRBY', rate, 'i' .. minute, intstr(ai))
    redis.call('HINCRBY', rate, 'o' .. minute, intstr(ao))
    redis.call('HDEL', rate, 'i' .. (minute - 5), 'o' .. (minute - 5))
  end
  if dur > 0 then
    local d = st.dur
    if d <= 0 then d = dur else d = 0.8 * d + 0.2 * dur end
    local ratio = 1
    if rmax > 0 then ratio = math.min(1, ao / rmax) end
    -- The answers' output: its mean and mean deviation (expected_out).
    local avg, dev = ao, ao / 2
    if st.on > 0 then
      dev = 0.8 * st.odev + 0.2 * math.abs(ao - st.oavg)
      avg = 0.8 * st.oavg + 0.2 * ao
    end
    redis.call('HSET', lim, 'dur', d, 'oratio', 0.8 * st.oratio + 0.2 * ratio,
      'oavg', avg, 'odev', dev, 'on', intstr(math.min(st.on + 1, 1000000)))
  end
  return true
end

-- quota_held takes a job's hold on its user's quotas and on its dollar
-- budgets (the q_req, q_tok and q_usd fields of its record, set at
-- admission) out of the record, once. The quotas live in the user's slot
-- and the budgets in the user's and the tenant's: the caller gives back
-- there what the job did not use (lua/quota.lua, lua/budget.lua). Reply,
-- as name, value pairs for a script's reply (scheduler's quotaHold):
-- {"requests", n, "tokens", n, "usd", µ$ held, "cost", µ$ its calls cost,
-- "day", day stamp, "month", month stamp}, or nil when the hold was taken
-- already.
local function quota_held(job)
  local q = redis.call('HMGET', job, 'q_req', 'q_tok', 'q_usd', 'cost_musd', 'b_d', 'b_m')
  local qreq, qtok, qusd = tonumber(q[1]), tonumber(q[2]), tonumber(q[3])
  if not (qreq or qtok or qusd) then return nil end
  redis.call('HDEL', job, 'q_req', 'q_tok', 'q_usd')
  return {'requests', qreq or 0, 'tokens', qtok or 0, 'usd', qusd or 0, 'cost', tonumber(q[4]) or 0,
    'day', tonumber(q[5]) or 0, 'month', tonumber(q[6]) or 0}
end

-- Prompt caching. A job's cacheable prefixes are kept in its record
-- (c_pre) as "hash:tokens:ttl_ms;…": each breakpoint's prefix hash, its
-- estimated input tokens and its cache lifetime. A group's cache hash
-- (KEY cache) holds what the upstream told sluice about them:
--   <hash>      until when the upstream holds the prefix cached (ms): an
--               answer reported reading or writing it; each use extends it
--   n:<hash>    until when the prefix is taken as not cacheable: an
--               answer that carried it reported no cache use
--   w:<hash>    "<job id>,<ms>": a call that will write the prefix is in
--               flight, and jobs sharing the prefix wait for its answer to
--               begin until then (cache-aware dispatch); "!,<ms>": a write
--               was awaited in vain, no holding for the prefix until then

local function cache_prefixes(s)
  local out = {}
  for h, t, ttl in string.gmatch(s or '', '([^:;]+):([^:;]+):([^:;]+)') do
    out[#out + 1] = {h = h, tokens = tonumber(t) or 0, ttl = tonumber(ttl) or 300000}
  end
  return out
end

-- cache_cached is how many of a job's input tokens the upstream is known
-- to hold cached until after at: the tokens of its longest prefix whose
-- entry lives past at (0 when none).
local function cache_cached(key, ps, at)
  local best = 0
  for _, p in ipairs(ps) do
    if p.tokens > best then
      local u = tonumber(redis.call('HGET', key, p.h))
      if u and u > at then best = p.tokens end
    end
  end
  return best
end

-- A user's hourly quotas are token buckets of the hourly figures, refilled
-- continuously, in one hash (r, t, ts, x) in the user's own slot
-- (quota.lua; outside a cluster admit.lua charges them in the admission's
-- own step). quota_level brings them up to now: the levels (0 for an
-- unlimited figure), whether the hash exists, and whether its time to live
-- is due for renewal (see quota_save).
local function quota_level(key, now, rph, tph)
  local q = redis.call('HMGET', key, 'r', 't', 'ts', 'x')
  local dt = math.max(0, now - num(q[3], now))
  local r, t = 0, 0
  if rph > 0 then r = math.min(rph, num(q[1], rph) + rph / 3600000 * dt) end
  if tph > 0 then t = math.min(tph, num(q[2], tph) + tph / 3600000 * dt) end
  return r, t, q[3] ~= false, renew_due(q[4], now, 3600000)
end

-- quota_refusal is the reply refusing a job of cost tokens at levels r and
-- t, or nil when both buckets can hold it: {"outcome", "quota", "which",
-- "requests"|"tokens", "retry_ms", ms, "limit", the hourly figure,
-- "remaining", the bucket's level (floor)}.
local function quota_refusal(r, t, rph, tph, cost)
  if rph > 0 and r < 1 then
    return {'outcome', 'quota', 'which', 'requests', 'retry_ms', math.ceil((1 - r) / (rph / 3600000)),
      'limit', rph, 'remaining', math.floor(r)}
  end
  if tph > 0 and t < cost then
    return {'outcome', 'quota', 'which', 'tokens', 'retry_ms', math.ceil((cost - t) / (tph / 3600000)),
      'limit', tph, 'remaining', math.floor(t)}
  end
  return nil
end

-- quota_save stores the levels r and t as of now. A bucket is full again
-- an hour after its last change at most, and then it may be forgotten: the
-- hash lives two hours from its last renewal (x), renewed when that is an
-- hour old (renew, from quota_level), so one EXPIRE serves an hour of
-- changes.
local function quota_save(key, now, r, t, renew)
  if renew then
    redis.call('HSET', key, 'r', r, 't', t, 'ts', now, 'x', now)
    redis.call('EXPIRE', key, 7200)
  else
    redis.call('HSET', key, 'r', r, 't', t, 'ts', now)
  end
end

-- quota_take charges a job (one request, cost tokens) that quota_refusal
-- let through; it returns the requests remaining (-1: unlimited) and the
-- seconds until the request bucket is full.
local function quota_take(key, now, r, t, rph, tph, cost, renew)
  local remaining, reset = -1, 0
  if rph > 0 then
    r = r - 1
    remaining = math.floor(r)
    reset = math.ceil((rph - r) / (rph / 3600))
  end
  if tph > 0 then t = t - cost end
  quota_save(key, now, r, t, renew)
  return remaining, reset
end
