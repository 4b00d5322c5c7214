-- admit.lua: decide and record the admission of a job, atomically:
--   1. an Idempotency-Key seen before returns the earlier job (or, with
--      another body, a conflict);
--   2. the user may not have more than max_queued jobs waiting in the group;
--   3. the job's estimated wait may not exceed max_wait;
-- then store the record (with the quota the job holds: the user's quotas
-- live in the user's own slot; in a cluster lua/quota.lua charged them just
-- before, and a refusal here is given back; on one Redis they are checked
-- here, after idempotency, and charged only when the job is admitted),
-- put the job in its user's lane
-- of the group's fair queue, index it for listing, log its `queued` event
-- and wake the dispatchers. A refusal changes nothing.
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
-- KEYS[1] job hash   KEYS[2] the group's cache hash   KEYS[3] sequence   KEYS[4] order
-- KEYS[5] finish tags (zset user -> F)    KEYS[6] V          KEYS[7] costs
-- KEYS[8] queue totals   KEYS[9] limiter state   KEYS[10] idempotency key
-- KEYS[11] user counts    KEYS[12] tenant job index
-- KEYS[13] user job index   KEYS[14] deadlines
-- KEYS[15] the group's waiting users (user key -> queued jobs)
-- KEYS[16] the group's live jobs (id -> status initial and user key)
-- KEYS[17] background V (the background class's virtual time)
-- KEYS[18] delayed (retry waits)   KEYS[19] delayed tags   KEYS[20] batch line
-- KEYS[21] the user's quota hash (only when ARGV[23] is not "")
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] ttl seconds
-- ARGV[4] the job's cacheable prefixes ("hash:tokens:ttl_ms;…", "" = none)
-- ARGV[5] user key   ARGV[6] input estimate   ARGV[7] max_tokens   ARGV[8] weight
-- ARGV[9] wake channel    ARGV[10..13] rpm, input_tpm, output_tpm, burst ms
-- ARGV[14] max concurrency
-- ARGV[15] requests the job holds of the user's quota (0 = none)
-- ARGV[16] tokens the job holds of the user's quota (0 = none)
--   (both charged already by lua/quota.lua; ignored with ARGV[23])
-- ARGV[17] max queued (0 = unlimited)   ARGV[18] max wait ms (0 = unlimited)
-- ARGV[19] request body hash ("" = no idempotency key)   ARGV[20] key ttl seconds
-- ARGV[21] deadline ms (0 = none)
-- ARGV[22] "1" when the group counts cache reads against its input limit
-- ARGV[23] "requests per hour,tokens per hour": the user's quotas, to
--   check and charge here in KEYS[21] ("" = charged already, or none)
-- ARGV[24] the job's class: "background", or anything else for interactive
-- ARGV[25] ms: the job goes by the Message Batches API, and joins the
--   Messages line this long after admission if no batch took it by then
--   ("0" = it does not go by batch)
-- ARGV[26..] job hash field, value pairs
--
-- A job bound for a batch waits in the group's batch line (KEYS[20], by
-- admission time) for the worker that collects batches, and in the retry
-- waits (KEYS[18], due at its fallback time, with its start tag): if no
-- batch took it by then, the dispatch round puts it in the fair order like
-- any retry that came due, and it goes by the Messages API. It has no
-- place in the Messages line meanwhile (no position; eta unknown: a batch
-- takes up to 24 h) and does not charge its user's fair share there.
-- Job ids are 115 random bits: the record is not checked for existence.
-- Reply: name, value pairs (scheduler's admitOut), "outcome" first, one of:
--   "ok": "event" id, "position", "eta" seconds, "quota_remaining" requests
--     (-1: unlimited), "quota_reset" seconds until the request quota is full,
--     "created_at" ms on Redis's clock (0 when ARGV[1] gave the time)
--     (position 0 and eta -2: the job waits for a batch)
--   "quota": "which" ("requests"|"tokens"), "retry_ms", "limit", "remaining"
--   "replay": "job" id
--   "conflict"
--   "queue_limit": "queued", "limit"
--   "overloaded": "eta" seconds, "max_wait" seconds
--   "unavailable": "retry_ms", "down_ms": the group's outage outlasted its limit
-- (eta seconds is -1 while the group is in outage: nobody can tell)
local now = clock(ARGV[1])
local id, cin, cout, weight = ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
-- A job costs the user's fair share what the limiter will count: input the
-- upstream reads from its cache is not (unless the group counts reads).
-- (lua/cached.lua gives the same figure for the quota's charge.)
local cached = 0
if ARGV[4] ~= '' and ARGV[22] ~= '1' then
  cached = math.min(cache_cached(KEYS[2], cache_prefixes(ARGV[4]), now), cin - 1)
end
local cost = cin - math.max(0, cached) + cout

-- 1. Idempotency.
if ARGV[19] ~= '' then
  local prev = redis.call('GET', KEYS[10])
  if prev then
    local pid, phash = string.match(prev, '^([^|]*)|(.*)$')
    if phash == ARGV[19] then return {'outcome', 'replay', 'job', pid} end
    return {'outcome', 'conflict'}
  end
end

-- The user's quotas, when this step charges them (ARGV[23]).
local rph, tph, qr, qt = 0, 0, 0, 0
if ARGV[23] ~= '' then
  local a, b = string.match(ARGV[23], '^(%d+),(%d+)$')
  rph, tph = tonumber(a), tonumber(b)
  qr, qt = quota_level(KEYS[21], now, rph, tph)
  local refusal = quota_refusal(qr, qt, rph, tph, cost)
  if refusal then return refusal end
end

-- The group's upstream has been unreachable for longer than the outage
-- limit: its waiting jobs are failing, so a new one is refused.
local st = lim_load(KEYS[9], now, {tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])})
if st.down > 0 and st.down_fail > 0 and now >= st.down_fail then
  local at = num(redis.call('HGET', KEYS[9], 'probe_at'), now)
  return {'outcome', 'unavailable', 'retry_ms', math.max(1000, at - now), 'down_ms', now - st.down}
end

-- 2. Queue cap.
local maxq = tonumber(ARGV[17])
if maxq > 0 then
  local queued = math.max(0, num(redis.call('HGET', KEYS[11], 'queued'), 0))
  if queued >= maxq then return {'outcome', 'queue_limit', 'queued', queued, 'limit', maxq} end
end

-- 3. The wait this job would have: its rank among jobs with start tags up
-- to its own. A lost V (key evicted) is taken as the tag of its class's
-- first waiting job, so a newcomer does not jump the line; the dispatch
-- round stores it again. A background job's position counts the
-- background jobs ahead of it; its eta also counts every interactive job,
-- all of which go first.
local bg = ARGV[24] == 'background'
local base = bg and BG or 0
local v = tonumber(redis.call('GET', bg and KEYS[17] or KEYS[6]))
-- An interactive V in background space was set by a dispatcher of a
-- release before classes: taken as lost.
if v and not bg and v >= BG then v = nil end
if not v then v = class_head(KEYS[4], bg) or base end
local fmember = finish_member(ARGV[5], bg)
local f = num(redis.call('ZSCORE', KEYS[5], fmember), base)
local tag = math.max(v, f, base)
local rank = redis.call('ZCOUNT', KEYS[4], '-inf', tag) + 1
local position = rank
if bg then position = redis.call('ZCOUNT', KEYS[4], BG, tag) + 1 end
-- Totals that drifted after a lost key count as empty (the dispatch round
-- rebuilds them): n is at least 1 here, never 0 or less. They are written
-- back as counted here: one HSET rather than totals_add's three HINCRBY.
local t = redis.call('HMGET', KEYS[8], 'n', 'in', 'out')
local n0 = math.max(0, num(t[1], 0))
local n, tin, tout = n0 + 1, cin, cout
if n0 > 0 then tin, tout = math.max(0, num(t[2], 0)) + cin, math.max(0, num(t[3], 0)) + cout end
local eta = eta_seconds(st, rank, tin / n, tout / n, tonumber(ARGV[14]))
local batch = tonumber(ARGV[25]) or 0
local maxwait = tonumber(ARGV[18])
if batch > 0 then
  position, eta = 0, -2
elseif maxwait > 0 and eta >= 0 and eta * 1000 > maxwait then
  return {'outcome', 'overloaded', 'eta', eta, 'max_wait', math.floor(maxwait / 1000)}
end

-- The fair queue. A sequence that starts again (its key was lost) while
-- jobs wait would sort newcomers ahead of them among equal tags: it goes
-- on from the clock (ms × 1000) instead, above any count it had reached.
local seq = redis.call('INCR', KEYS[3])
if seq == 1 and redis.call('ZCARD', KEYS[4]) > 0 then
  seq = now * 1000
  redis.call('SET', KEYS[3], intstr(seq))
end
local member = string.format('%016d', seq) .. '|' .. id
if batch > 0 then
  redis.call('ZADD', KEYS[18], now + batch, member)
  redis.call('HSET', KEYS[19], member, tagstr(tag) .. ';' .. intstr(cin) .. ',' .. intstr(cout))
  redis.call('ZADD', KEYS[20], now, member)
else
  redis.call('ZADD', KEYS[4], tag, member)
  redis.call('ZADD', KEYS[5], tag + cost / weight, fmember)
  redis.call('HSET', KEYS[7], member, intstr(cin) .. ',' .. intstr(cout))
  redis.call('HSET', KEYS[8], 'n', intstr(n), 'in', intstr(tin), 'out', intstr(tout))
end
if tonumber(ARGV[21]) > 0 then
  redis.call('ZADD', KEYS[14], ARGV[21], member)
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
local rnow = now -- Redis's clock, unless the caller gave the time
if tonumber(ARGV[1]) > 0 then
  local rt = redis.call('TIME')
  rnow = tonumber(rt[1]) * 1000 + math.floor(tonumber(rt[2]) / 1000)
end
local ev = intstr(rnow - 1) .. '-0'
local qreq, qtok = ARGV[15], ARGV[16]
if ARGV[23] ~= '' then
  qreq, qtok = (rph > 0) and 1 or 0, (tph > 0) and intstr(cost) or 0
end
local fields = {}
for i = 26, #ARGV do fields[#fields + 1] = ARGV[i] end
-- On Redis's clock, created_at is the moment of admission (the caller's
-- stamp was taken before its request came here), on the clock every
-- dispatch and event of the group uses: no dispatch made before the job
-- was queued can seem to have come after it.
local created = 0
if tonumber(ARGV[1]) == 0 then
  created = now
  fields[#fields + 1] = 'created_at'
  fields[#fields + 1] = intstr(now)
end
if ARGV[4] ~= '' then
  fields[#fields + 1] = 'c_pre'
  fields[#fields + 1] = ARGV[4]
end
if batch > 0 then
  fields[#fields + 1] = 'batch_due'
  fields[#fields + 1] = intstr(now + batch)
end
redis.call('HSET', KEYS[1], 'fq_member', member, 'fq_tag', tagstr(tag),
  'cost_in', cin, 'cost_out', cout, 'dispatch', 0, 'q_req', qreq,
  'q_tok', qtok, 'ev0_id', ev, 'ev0', data, unpack(fields))
local ttl = tonumber(ARGV[3])
redis.call('EXPIRE', KEYS[1], intstr(ttl))
counts_add(KEYS[11], 'queued', 1)
redis.call('HINCRBY', KEYS[15], ARGV[5], 1)
redis.call('HSET', KEYS[16], id, 'q' .. ARGV[5])
redis.call('EXPIRE', KEYS[11], intstr(ttl))
-- Listing indexes, scored by creation time in ms × 1000 + the group's
-- sequence (mod 1000), so jobs created in the same millisecond still list
-- newest first (exact in a double until the year 2255).
local score = now * 1000 + seq % 1000
for _, k in ipairs({KEYS[12], KEYS[13]}) do
  redis.call('ZADD', k, score, id)
  -- Entries older than the records they name: trimmed now and then.
  if seq % 64 == 0 then redis.call('ZREMRANGEBYSCORE', k, '-inf', (now - ttl * 1000) * 1000) end
  redis.call('EXPIRE', k, intstr(ttl))
end
if ARGV[19] ~= '' then
  redis.call('SET', KEYS[10], id .. '|' .. ARGV[19], 'EX', ARGV[20])
end

local remaining, reset = -1, 0
if ARGV[23] ~= '' then
  remaining, reset = quota_take(KEYS[21], now, qr, qt, rph, tph, cost)
end
redis.call('PUBLISH', ARGV[9], 'arrival')
return {'outcome', 'ok', 'event', ev, 'position', position, 'eta', eta, 'quota_remaining', remaining, 'quota_reset', reset, 'created_at', created}
