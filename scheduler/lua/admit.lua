-- admit.lua: decide and record the admission of one or more jobs of one
-- model group, atomically and in order (the api gathers the admissions
-- that arrive while the group's previous call runs into the next call: one
-- script's start, limiter read and wake-up serve them all). For each job,
-- exactly as if it came alone after the ones before it:
--   1. an Idempotency-Key seen before returns the earlier job (or, with
--      another body, a conflict);
--   2. the user may not have more than max_queued jobs waiting in the group;
--   3. the job's estimated wait may not exceed max_wait;
-- then store the record (with the quota the job holds: the user's quotas
-- live in the user's own slot; in a cluster lua/quota.lua charged them just
-- before, and a refusal here is given back; on one Redis they are checked
-- here, after idempotency, and charged only when the job is admitted),
-- put the job in its user's lane of the group's fair queue, index it for
-- listing, log its `queued` event and wake the dispatchers. A refusal
-- changes nothing.
--
-- Fair order is start-time fair queuing over users. A job's start tag is
-- max(V, F_user): V is the start tag of the last job dispatched, F_user the
-- finish tag of the user's previous job; its finish tag adds its cost
-- (estimated input + max_tokens) divided by the user's weight. Jobs are
-- dispatched in start-tag order (ties: arrival), so a user's own jobs stay
-- FIFO, an idle user banks no credit (its tag starts at V), and a newcomer
-- behind a heavy user's backlog is next. The queue is one sorted set of all
-- the group's jobs by start tag: pick and rank are O(log n).
--
-- The group's keys:
-- KEYS[1] the group's cache hash   KEYS[2] sequence   KEYS[3] order
-- KEYS[4] finish tags (zset user -> F)   KEYS[5] V   KEYS[6] costs
-- KEYS[7] queue totals   KEYS[8] limiter state   KEYS[9] deadlines
-- KEYS[10] the group's waiting users (user key -> queued jobs)
-- KEYS[11] the group's live jobs (id -> status initial and user key)
-- KEYS[12] background V (the background class's virtual time)
-- KEYS[13] delayed (retry waits)   KEYS[14] delayed tags   KEYS[15] batch line
-- then each job's keys, in the jobs' order: its record, its idempotency key,
-- its user's counts, the tenant's job index, the user's job index, and the
-- user's quota hash when the job's quotas are checked here (its ARGV 14).
-- ARGV[1] record ttl seconds   ARGV[2] wake channel
-- ARGV[3..6] rpm, input_tpm, output_tpm, burst ms   ARGV[7] max concurrency
-- ARGV[8] "1" when the group counts cache reads against its input limit
-- ARGV[9] idempotency key ttl seconds
-- then each job's arguments, 17 and its record's fields:
--   1 now ms (0 = Redis TIME)   2 job id
--   3 the job's cacheable prefixes ("hash:tokens:ttl_ms;…", "" = none)
--   4 user key   5 input estimate   6 max_tokens   7 weight
--   8 requests the job holds of the user's quota (0 = none)
--   9 tokens the job holds of the user's quota (0 = none)
--     (both charged already by lua/quota.lua; ignored with 14)
--   10 max queued (0 = unlimited)   11 max wait ms (0 = unlimited)
--   12 request body hash ("" = no idempotency key)   13 deadline ms (0 = none)
--   14 "requests per hour,tokens per hour": the user's quotas, to check and
--      charge here in the job's sixth key ("" = charged already, or none)
--   15 the job's class: "background", or anything else for interactive
--   16 ms: the job goes by the Message Batches API, and joins the Messages
--      line this long after admission if no batch took it by then ("0" = it
--      does not go by batch)
--   17 n, then n record field, value arguments
--
-- A job bound for a batch waits in the group's batch line (by admission
-- time) for the worker that collects batches, and in the retry waits (due
-- at its fallback time, with its start tag): if no batch took it by then,
-- the dispatch round puts it in the fair order like any retry that came
-- due, and it goes by the Messages API. It has no place in the Messages
-- line meanwhile (no position; eta unknown: a batch takes up to 24 h) and
-- does not charge its user's fair share there.
-- Job ids are 115 random bits: the record is not checked for existence.
--
-- Writes no later job of the call reads (costs, live jobs, waiting users,
-- deadlines, listing indexes, totals, the sequence, TTLs) are made once,
-- at the end, for all the jobs admitted.
--
-- Reply: one entry per job, in order, each name, value pairs (scheduler's
-- admitOut), "outcome" first, one of:
--   "ok": "event" id, "position", "eta" seconds, "quota_remaining" requests
--     (-1: unlimited), "quota_reset" seconds until the request quota is full,
--     "created_at" ms on Redis's clock (0 when the job gave the time)
--     (position 0 and eta -2: the job waits for a batch)
--   "quota": "which" ("requests"|"tokens"), "retry_ms", "limit", "remaining"
--   "replay": "job" id
--   "conflict"
--   "queue_limit": "queued", "limit"
--   "overloaded": "eta" seconds, "max_wait" seconds
--   "unavailable": "retry_ms", "down_ms": the group's outage outlasted its limit
-- (eta seconds is -1 while the group is in outage: nobody can tell)
local call = redis.call
local ttl = tonumber(ARGV[1])
local ttls = intstr(ttl)
local cfg = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local max_conc = tonumber(ARGV[7])
local count_reads = ARGV[8] == '1'

-- Redis's clock, read once for the whole call.
local rtime
local function redis_now()
  if not rtime then rtime = clock(0) end
  return rtime
end

-- The limiter state, read once (admission does not change it), again
-- only for a job that gave another time.
local st
local function limiter(now)
  if not st or st.now ~= now then st = lim_load(KEYS[8], now, cfg) end
  return st
end

-- The queue totals, read once and kept here; written back at the end.
-- Totals that drifted after a lost key count as empty (the dispatch round
-- rebuilds them): n is at least 1 once a job is counted, never 0 or less.
local tot
local function totals()
  if not tot then
    local t = redis.call('HMGET', KEYS[7], 'n', 'in', 'out')
    tot = {n = math.max(0, num(t[1], 0)), i = 0, o = 0}
    if tot.n > 0 then tot.i, tot.o = math.max(0, num(t[2], 0)), math.max(0, num(t[3], 0)) end
  end
  return tot
end

-- V of each class, read once. A lost V (key evicted) is taken as the tag
-- of its class's first waiting job, so a newcomer does not jump the line;
-- the dispatch round stores it again. Admission never lowers a class's
-- first tag, so that stays V for the rest of the call, except in a class
-- with nobody waiting, whose first admitted job's tag becomes it.
local vt = {}
local function vtime(bg)
  local c = vt[bg]
  if c then return c end
  local v = tonumber(redis.call('GET', bg and KEYS[12] or KEYS[5]))
  -- An interactive V in background space was set by a dispatcher of a
  -- release before classes: taken as lost.
  if v and not bg and v >= BG then v = nil end
  c = {v = v}
  if not v then
    c.v = class_head(KEYS[3], bg)
    c.empty = c.v == nil
    if c.empty then c.v = bg and BG or 0 end
  end
  vt[bg] = c
  return c
end

-- The group's sequence, one INCR for the call. A sequence that starts
-- again (its key was lost) while jobs wait would sort newcomers ahead of
-- them among equal tags: it goes on from the clock (ms × 1000) instead,
-- above any count it had reached.
local seq, seq_set
local function next_seq(now)
  if seq then
    seq, seq_set = seq + 1, true
    return seq
  end
  seq = redis.call('INCR', KEYS[2])
  if seq == 1 and redis.call('ZCARD', KEYS[3]) > 0 then seq, seq_set = now * 1000, true end
  return seq
end

-- What the end writes: costs, live entries and deadlines as argument lists,
-- the listing indexes' entries by index (and the indexes to trim, with the
-- score below which entries go; the tenant's, shared, have their TTL
-- renewed each call), waiting users' increments, and the users' counts
-- whose TTL (and their job index's) is renewed, with the time.
local costs, live, deadlines, index, trim, waiting, renew, shared = {}, {}, {}, {}, {}, {}, {}, {}
local RENEW = 60
local admitted = false

-- admit decides the job whose keys start at KEYS[k] and arguments at
-- ARGV[i]; nf is its number of record field and value arguments.
local function admit(k, i, nf)
  local now, id, pre, ukey, ins, outs, weight, hreq, htok, maxq, maxwait, bhash, deadline, quotas, class, batch =
    unpack(ARGV, i, i + 15)
  now = tonumber(now)
  local given = now > 0
  if not given then now = redis_now() end
  local cin, cout = tonumber(ins), tonumber(outs)
  weight = tonumber(weight)
  -- A job costs the user's fair share what the limiter will count: input the
  -- upstream reads from its cache is not (unless the group counts reads).
  -- (lua/cached.lua gives the same figure for the quota's charge.)
  local cached = 0
  if pre ~= '' and not count_reads then
    cached = math.min(cache_cached(KEYS[1], cache_prefixes(pre), now), cin - 1)
  end
  local cost = cin - math.max(0, cached) + cout

  -- 1. Idempotency.
  if bhash ~= '' then
    local prev = call('GET', KEYS[k + 1])
    if prev then
      local pid, phash = string.match(prev, '^([^|]*)|(.*)$')
      if phash == bhash then return {'outcome', 'replay', 'job', pid} end
      return {'outcome', 'conflict'}
    end
  end

  -- The user's quotas, when this step charges them.
  local rph, tph, qr, qt, qrenew = 0, 0, 0, 0, false
  if quotas ~= '' then
    local x, y = string.match(quotas, '^(%d+),(%d+)$')
    rph, tph = tonumber(x), tonumber(y)
    local _
    qr, qt, _, qrenew = quota_level(KEYS[k + 5], now, rph, tph)
    local refusal = quota_refusal(qr, qt, rph, tph, cost)
    if refusal then return refusal end
  end

  -- The group's upstream has been unreachable for longer than the outage
  -- limit: its waiting jobs are failing, so a new one is refused.
  local st = limiter(now)
  if st.down > 0 and st.down_fail > 0 and now >= st.down_fail then
    local at = num(call('HGET', KEYS[8], 'probe_at'), now)
    return {'outcome', 'unavailable', 'retry_ms', math.max(1000, at - now), 'down_ms', now - st.down}
  end

  -- 2. Queue cap. (The counts' renewal stamp comes in the same read.)
  maxq = tonumber(maxq)
  local renewed
  if maxq > 0 then
    local c = call('HMGET', KEYS[k + 2], 'queued', 'x')
    local queued = math.max(0, num(c[1], 0))
    renewed = c[2]
    if queued >= maxq then return {'outcome', 'queue_limit', 'queued', queued, 'limit', maxq} end
  end

  -- 3. The wait this job would have: its rank among jobs with start tags up
  -- to its own. A background job's position counts the background jobs
  -- ahead of it; its eta also counts every interactive job, all of which
  -- go first.
  local bg = class == 'background'
  local base = bg and BG or 0
  local vc = vtime(bg)
  local fmember = finish_member(ukey, bg)
  local f = num(call('ZSCORE', KEYS[4], fmember), base)
  local tag = math.max(vc.v, f, base)
  local rank = call('ZCOUNT', KEYS[3], '-inf', tag) + 1
  local position = rank
  if bg then position = call('ZCOUNT', KEYS[3], BG, tag) + 1 end
  local t = totals()
  local n, tin, tout = t.n + 1, t.i + cin, t.o + cout
  local eta = eta_seconds(st, rank, tin / n, tout / n, max_conc)
  batch = tonumber(batch) or 0
  maxwait = tonumber(maxwait)
  if batch > 0 then
    position, eta = 0, -2
  elseif maxwait > 0 and eta >= 0 and eta * 1000 > maxwait then
    return {'outcome', 'overloaded', 'eta', eta, 'max_wait', math.floor(maxwait / 1000)}
  end

  -- Admitted: the fair queue.
  local sq = next_seq(now)
  local member = string.format('%016d', sq) .. '|' .. id
  if batch > 0 then
    call('ZADD', KEYS[13], now + batch, member)
    call('HSET', KEYS[14], member, tagstr(tag) .. ';' .. intstr(cin) .. ',' .. intstr(cout))
    call('ZADD', KEYS[15], now, member)
  else
    call('ZADD', KEYS[3], tag, member)
    call('ZADD', KEYS[4], tag + cost / weight, fmember)
    costs[#costs + 1] = member
    costs[#costs + 1] = ins .. ',' .. outs
    t.n, t.i, t.o = n, tin, tout
    if vc.empty then vc.v, vc.empty = tag, false end
  end
  if tonumber(deadline) > 0 then
    deadlines[#deadlines + 1] = deadline
    deadlines[#deadlines + 1] = member
  end

  -- The record, with the job's first event: it lives in the record (a
  -- stream per job costs more than the rest of admission), and the log's
  -- readers put it first. Its id is a millisecond before Redis's clock, so
  -- every later event (XADD '*') sorts after it. Nobody can follow the job
  -- before it exists: it is not published.
  local data = '{"position":' .. position .. ',"eta_seconds":' .. eta .. '}'
  if batch > 0 then
    data = '{"position":null,"eta_seconds":null,"reason":"batch"}'
  elseif eta < 0 then
    data = '{"position":' .. position .. ',"eta_seconds":null,"reason":"upstream_unavailable"}'
  end
  local rnow = now -- Redis's clock, unless the job gave the time
  if given then rnow = redis_now() end
  local ev = intstr(rnow - 1) .. '-0'
  local qreq, qtok = hreq, htok
  if quotas ~= '' then
    qreq, qtok = (rph > 0) and '1' or '0', (tph > 0) and intstr(cost) or '0'
  end
  -- On Redis's clock, created_at is the moment of admission (the caller's
  -- stamp was taken before its request came here), on the clock every
  -- dispatch and event of the group uses: no dispatch made before the job
  -- was queued can seem to have come after it. A job that gave the time
  -- has its own created_at among its fields, which come last and win.
  local created = given and 0 or now
  call('HSET', KEYS[k], 'fq_member', member, 'fq_tag', tagstr(tag), 'cost_in', ins, 'cost_out', outs,
    'dispatch', '0', 'q_req', qreq, 'q_tok', qtok, 'ev0_id', ev, 'ev0', data, 'created_at', now,
    unpack(ARGV, i + 17, i + 16 + nf))
  if batch > 0 then call('HSET', KEYS[k], 'batch_due', intstr(now + batch)) end
  call('EXPIRE', KEYS[k], ttls)
  counts_add(KEYS[k + 2], 'queued', 1)
  waiting[ukey] = (waiting[ukey] or 0) + 1
  live[#live + 1] = id
  live[#live + 1] = 'q' .. ukey
  -- The user's counts and job index live RENEW seconds longer than a
  -- record from the user's last admission, renewed (stamp x in the counts)
  -- once in RENEW seconds rather than at each admission.
  if renewed == nil then renewed = call('HGET', KEYS[k + 2], 'x') end
  if renew_due(renewed, now, RENEW * 1000) then
    renew[KEYS[k + 2]] = {KEYS[k + 4], now}
  end
  -- Listing indexes, scored by creation time in ms × 1000 + the group's
  -- sequence (mod 1000), so jobs created in the same millisecond still list
  -- newest first (exact in a double until the year 2255). (Redis writes a
  -- Lua number argument with 17 digits: whole numbers this size exactly.)
  local score = now * 1000 + sq % 1000
  for x = k + 3, k + 4 do
    local ix = index[KEYS[x]]
    if not ix then
      ix = {}
      index[KEYS[x]] = ix
    end
    ix[#ix + 1] = score
    ix[#ix + 1] = id
    if x == k + 3 then shared[KEYS[x]] = true end
    -- Entries older than the records they name: trimmed now and then.
    if sq % 64 == 0 then trim[KEYS[x]] = (now - ttl * 1000) * 1000 end
  end
  if bhash ~= '' then
    call('SET', KEYS[k + 1], id .. '|' .. bhash, 'EX', ARGV[9])
  end

  local remaining, reset = -1, 0
  if quotas ~= '' then
    remaining, reset = quota_take(KEYS[k + 5], now, qr, qt, rph, tph, cost, qrenew)
  end
  admitted = true
  return {'outcome', 'ok', 'event', ev, 'position', position, 'eta', eta, 'quota_remaining', remaining, 'quota_reset', reset, 'created_at', created}
end

local out = {}
local k, i = 16, 10
while i <= #ARGV do
  local nf = tonumber(ARGV[i + 16])
  local nk = (ARGV[i + 13] ~= '') and 6 or 5
  out[#out + 1] = admit(k, i, nf)
  k, i = k + nk, i + 17 + nf
end

if #costs > 0 then
  call('HSET', KEYS[6], unpack(costs))
  call('HSET', KEYS[7], 'n', intstr(tot.n), 'in', intstr(tot.i), 'out', intstr(tot.o))
end
if seq_set then call('SET', KEYS[2], intstr(seq)) end
if #deadlines > 0 then call('ZADD', KEYS[9], unpack(deadlines)) end
if #live > 0 then call('HSET', KEYS[11], unpack(live)) end
for ukey, c in pairs(waiting) do call('HINCRBY', KEYS[10], ukey, intstr(c)) end
for key, entries in pairs(index) do
  call('ZADD', key, unpack(entries))
  if trim[key] then call('ZREMRANGEBYSCORE', key, '-inf', trim[key]) end
  if shared[key] then call('EXPIRE', key, ttls) end
end
for key, r in pairs(renew) do
  call('HSET', key, 'x', intstr(r[2]))
  call('EXPIRE', key, intstr(ttl + RENEW))
  call('EXPIRE', r[1], intstr(ttl + RENEW))
end
if admitted then call('PUBLISH', ARGV[2], 'arrival') end
return out
