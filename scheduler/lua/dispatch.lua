-- dispatch.lua: the dispatcher's one decision. Take the group's next jobs in
-- fair order while the limiter has room for them, reserving for each 1
-- request, its input estimate and max_tokens of output, and a concurrency
-- lease; or say why not and until when.
--
-- Before picking it returns due retries (delayed set) and jobs whose lease
-- expired (their worker died) to the queue at their original start tag.
-- A job that already holds a reservation (its worker died after dispatch)
-- keeps it: it is not charged twice.
--
-- Nothing a lost key (an eviction under allkeys-lru, a careless DEL) can
-- wedge: each round first checks the queue's structures against each
-- other (repair, below) and, when some live job sits in none of them, looks
-- for it (sweep); a member whose record is gone is dropped, not picked.
--
-- Any number of dispatchers (one per worker process) may run this at once:
-- the script is atomic, so a job is picked once. Picked jobs go to a
-- `dispatching` set until they are handed to asynq, so a dispatcher that
-- dies in between leaves them for another to hand over.
--
-- KEYS[1] order   KEYS[2] delayed   KEYS[3] V   KEYS[4] finish tags
-- KEYS[5] costs   KEYS[6] totals    KEYS[7] limiter state
-- KEYS[8] reservations   KEYS[9] leases   KEYS[10] dispatching
-- KEYS[11] delayed tags   KEYS[12] deadlines   KEYS[13] expiring
-- KEYS[14] dispatch sequence   KEYS[15] the group's use per minute (dispatches: minute -> n)
-- KEYS[16] the group's live jobs (id -> status initial and user key)
-- KEYS[17] the group's waiting users   KEYS[18] the group's cache hash
-- KEYS[19] background V   KEYS[20] the group's jobs in batches (lua/batch.lua)
-- ARGV[1] now ms (0 = Redis TIME)  ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- ARGV[6] max concurrency   ARGV[7] lease ms   ARGV[8] most jobs to pick
-- ARGV[9] key prefix ("sluice:"): a job's record is jkey(id)   ARGV[10] moved channel
-- ARGV[11] job event channel prefix   ARGV[12] event log max length
-- ARGV[13] ms: a longer gap between two rounds means the dispatchers (or
--   Redis) were away
-- ARGV[14] the group's user key prefix ("sluice:{tag}:user:")
-- ARGV[15] how the upstream counts output: produced | reserved
-- ARGV[16] cache hold ms (0 = no hold)   ARGV[17] "1": cache reads count
--   against the input limit
-- ARGV[18] background's minimum share of the dispatches (0..1)
-- Reply: name, value pairs (scheduler's dispatchOut): "state", "wait_ms" ms,
--   "expiring" how many jobs wait in the expiring set, "jobs" the jobs
--   picked ({"job", id, "dispatch", n} each), "probe_model" (state probe)
--   state "more"  the pick limit was reached: call again at once
--         "wait"  the next job fits in ms (limiter or freeze)
--         "full"  every concurrency slot is taken; the first lease ends in ms
--         "empty" nothing queued; the next retry is due in ms (-1: none)
--         "hold"  every job that could go waits for another's call to
--                 write a prompt-cache prefix they share; the first hold
--                 ends in ms (or sooner, when that call's answer begins)
--         "down"  the group is in outage; the next probe may go in ms (the
--                 one job picked, if any, is the probe)
--         "probe" the group is in outage, a probe is due and no job waits
--                 to be it: the caller probes without a job (the model to
--                 ask about: probe_model) and reports the outcome
--   (a queued job's deadline coming sooner shortens ms)
-- Jobs whose deadline passed leave the queue for the expiring set, where the
-- dispatcher expires them; jobs canceled while queued are dropped.
local now = clock(ARGV[1])
local cfg = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local max_conc, lease_ms, max_pick, prefix = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
-- A job's record, named from its id as rkeys.Job names it: the id's tag
-- (the 3 characters after "job_") is its group's slot.
local function jkey(id) return prefix .. '{' .. string.sub(id, 5, 7) .. '}:job:' .. id end
local produced = ARGV[15] == 'produced'
local hold_ms, count_reads = tonumber(ARGV[16]) or 0, ARGV[17] == '1'
-- moved counts jobs that entered or left the order: waiting jobs' positions
-- changed, and the api processes following them are told (ARGV[10]).
local moved = 0

-- back_to_queue puts a job back in the order at its start tag, with its
-- cost (and the queue totals, the first time).
local function back_to_queue(member, tag, cost)
  local cin, cout = split2(cost)
  cin, cout = cin or 0, cout or 0
  moved = moved + 1
  if redis.call('ZADD', KEYS[1], tag or 0, member) == 1 then
    totals_add(KEYS[6], 1, cin, cout)
  end
  redis.call('HSET', KEYS[5], member, intstr(cin) .. ',' .. intstr(cout))
end

-- Self-repair. Every structure here is kept by these atomic scripts in
-- step with another, so a lost key (an eviction, a careless DEL) shows as
-- two that disagree, and is rebuilt from its partner and the job records:
--   order <-> costs: one entry each per queued job. An order entry without
--     its cost gets the record's (0,0 without a record); a cost without its
--     order entry is queued again at the record's start tag if the record
--     says the job still waits (queued or running, this member, no lease,
--     not waiting to retry or to expire), else dropped.
--   delayed <-> delayed tags: one entry each per job waiting to retry;
--     rebuilt the same way (a retry whose wait was lost is due now).
--   totals: n is the number of costs, in and out their sums; rebuilt
--     whenever n disagrees or a sum is negative.
-- The checks cost a few O(1) calls a round; a rebuild reads the sets once.
local function rec_waiting(id, member)
  local j = redis.call('HMGET', jkey(id), 'status', 'fq_member', 'fq_tag', 'cost_in', 'cost_out')
  if (j[1] ~= 'queued' and j[1] ~= 'running') or j[2] ~= member then return nil end
  if redis.call('ZSCORE', KEYS[9], id) or redis.call('ZSCORE', KEYS[13], id) then return nil end
  return j
end

-- set_of makes a lookup table of a reply: its members (step 1) or the
-- fields of a hash's field, value list (step 2).
local function set_of(list, step)
  local t = {}
  for k = 1, #list, step do t[list[k]] = true end
  return t
end

local function repair()
  if redis.call('ZCARD', KEYS[1]) ~= redis.call('HLEN', KEYS[5]) then
    local costs = set_of(redis.call('HGETALL', KEYS[5]), 2)
    local order = set_of(redis.call('ZRANGE', KEYS[1], 0, -1), 1)
    for member in pairs(order) do
      if not costs[member] then
        local j = redis.call('HMGET', jkey(string.match(member, '|(.*)$')), 'cost_in', 'cost_out')
        redis.call('HSET', KEYS[5], member, intstr(j[1]) .. ',' .. intstr(j[2]))
      end
    end
    for member in pairs(costs) do
      if not order[member] then
        local j = rec_waiting(string.match(member, '|(.*)$'), member)
        if j and not redis.call('ZSCORE', KEYS[2], member) then
          redis.call('ZADD', KEYS[1], tonumber(j[3]) or 0, member)
          moved = moved + 1
        else
          redis.call('HDEL', KEYS[5], member)
        end
      end
    end
  end
  if redis.call('ZCARD', KEYS[2]) ~= redis.call('HLEN', KEYS[11]) then
    local tags = set_of(redis.call('HGETALL', KEYS[11]), 2)
    local delayed = set_of(redis.call('ZRANGE', KEYS[2], 0, -1), 1)
    for member in pairs(delayed) do
      if not tags[member] then
        local j = rec_waiting(string.match(member, '|(.*)$'), member)
        if j and not redis.call('ZSCORE', KEYS[1], member) then
          redis.call('HSET', KEYS[11], member, (j[3] or '0') .. ';' .. intstr(j[4]) .. ',' .. intstr(j[5]))
        else
          redis.call('ZREM', KEYS[2], member)
        end
      end
    end
    for member in pairs(tags) do
      if not delayed[member] then
        local j = rec_waiting(string.match(member, '|(.*)$'), member)
        if j and not redis.call('ZSCORE', KEYS[1], member) then
          redis.call('ZADD', KEYS[2], now, member)
        else
          redis.call('HDEL', KEYS[11], member)
        end
      end
    end
  end
  local t = redis.call('HMGET', KEYS[6], 'n', 'in', 'out')
  local n = redis.call('HLEN', KEYS[5])
  if num(t[1], 0) ~= n or num(t[2], 0) < 0 or num(t[3], 0) < 0 then
    local tin, tout = 0, 0
    local all = redis.call('HVALS', KEYS[5])
    for _, c in ipairs(all) do
      local cin, cout = split2(c)
      tin, tout = tin + (cin or 0), tout + (cout or 0)
    end
    redis.call('DEL', KEYS[6])
    if n > 0 then
      redis.call('HSET', KEYS[6], 'n', n, 'in', intstr(tin), 'out', intstr(tout))
    end
  end
end
repair()

local function leave_queue(member)
  local left = fq_leave(KEYS[1], KEYS[5], KEYS[6], KEYS[12], member)
  if left then moved = moved + 1 end
  return left
end

-- Retries whose delay is over.
-- A retry whose tag entry was lost is rebuilt from its record, if the
-- job still waits.
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local tc = redis.call('HGET', KEYS[11], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[11], member)
  if tc then
    local tag, cost = string.match(tc, '^([^;]*);(.*)$')
    back_to_queue(member, tonumber(tag), cost)
  else
    local j = rec_waiting(string.match(member, '|(.*)$'), member)
    if j then back_to_queue(member, tonumber(j[3]), intstr(j[4]) .. ',' .. intstr(j[5])) end
  end
end

-- A long gap since the last round (by Redis's own clock, whatever clock
-- the scripts are given) means Redis, or every dispatcher, was away: the
-- workers could not renew their leases meanwhile, so every lease gets one
-- fresh lease time before any may be found expired.
local t = redis.call('TIME')
local real = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('HGET', KEYS[7], 'round'))
if last and real - last > tonumber(ARGV[13]) then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now + lease_ms)) do
    redis.call('ZADD', KEYS[9], now + lease_ms, id)
  end
end
redis.call('HSET', KEYS[7], 'round', real)

-- Leases whose holder stopped renewing: the worker died mid-call. A lease
-- found past its time is first given a grace (a third of the lease, at
-- least 2 s) and taken back only if it is still not renewed after it: a
-- round can only see a lease run out while Redis answers, so a live holder
-- that could not renew while Redis was away (however long) gets that much
-- time with Redis back to say so, and its answer is not bought again. A
-- job whose attempt had started gets a `retrying` event (reason
-- worker_lost): its followers discard that attempt's text, as after any
-- retry. A job that ended meanwhile, or whose record is gone, has nobody
-- left to settle its reservation: it is dropped (nothing refunded).
local grace_ms = math.max(math.floor(lease_ms / 3), 2000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now)) do
  local j = redis.call('HMGET', jkey(id), 'status', 'fq_member', 'fq_tag', 'cost_in', 'cost_out',
    'attempt_open', 'attempts', 'lease_grace')
  local live = (j[1] == 'queued' or j[1] == 'running') and j[2]
  if live and not j[8] then
    redis.call('HSET', jkey(id), 'lease_grace', '1')
    redis.call('ZADD', KEYS[9], intstr(now + grace_ms), id)
  else
    redis.call('ZREM', KEYS[9], id)
    if j[8] then redis.call('HDEL', jkey(id), 'lease_grace') end
  end
  if not live then
    redis.call('HDEL', KEYS[8], id)
  elseif j[8] then
    if j[6] then
      redis.call('HDEL', jkey(id), 'attempt_open')
      local data = '{"attempt":' .. (j[7] or '0') .. ',"reason":"worker_lost","retry_in_seconds":0}'
      local ev = redis.call('XADD', jkey(id) .. ':events', 'MAXLEN', '~', ARGV[12], '*',
        'event', 'retrying', 'data', data)
      redis.call('PUBLISH', ARGV[11] .. id, '{"id":"' .. ev .. '","event":"retrying","data":' .. data .. '}')
    end
    if not redis.call('ZSCORE', KEYS[1], j[2]) then
      back_to_queue(j[2], tonumber(j[3]), intstr(j[4]) .. ',' .. intstr(j[5]))
    end
  end
end

-- leave_retry takes a job out of its retry wait.
local function leave_retry(member)
  if redis.call('ZREM', KEYS[2], member) == 0 then return false end
  redis.call('HDEL', KEYS[11], member)
  return true
end

-- Jobs whose deadline passed before they were dispatched (or while they
-- waited out an outage) go to the expiring set. Their deadline entry stays
-- until the job has ended (the step that ends it removes it): should the
-- expiring entry be lost, the next round finds the job still waiting and
-- puts it back.
local past = redis.call('ZRANGEBYSCORE', KEYS[12], '-inf', now, 'WITHSCORES')
for k = 1, #past, 2 do
  local member, at = past[k], past[k + 1]
  local id = string.match(member, '|(.*)$')
  local left = leave_queue(member)
  if leave_retry(member) then left = true end
  local keep = left or redis.call('ZSCORE', KEYS[13], id)
  if not keep then
    local j = redis.call('HMGET', jkey(id), 'status', 'fq_member')
    keep = (j[1] == 'queued' or j[1] == 'running') and j[2] == member and not redis.call('ZSCORE', KEYS[9], id)
  end
  if keep then
    redis.call('ZADD', KEYS[13], 'NX', now, id)
    redis.call('ZADD', KEYS[12], at, member)
  end
end

-- The safety net: the group's live jobs (admitted, not ended) are each in
-- the order, the retry queue, the expiring set, a lease or a batch. More live jobs
-- than those hold means some key was lost with jobs in it (say the order
-- and its costs both): every live job is looked at once. One whose record
-- still waits is queued again at its start tag (or, when a call of it may
-- still run, given a lease: its worker renews it, or it ends and the job
-- is queued again as after a worker's death); one whose record is gone is
-- forgotten, and so are its owner's count and waiting-user entry; one that
-- ended is dropped.
local function sweep()
  local nlive = redis.call('HLEN', KEYS[16])
  if nlive == 0 or nlive <= redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) +
      redis.call('ZCARD', KEYS[9]) + redis.call('ZCARD', KEYS[13]) + redis.call('ZCARD', KEYS[20]) then
    return
  end
  local all = redis.call('HGETALL', KEYS[16])
  for k = 1, #all, 2 do
    local id, state = all[k], all[k + 1]
    local j = redis.call('HMGET', jkey(id), 'status', 'fq_member', 'fq_tag', 'cost_in', 'cost_out', 'attempt_open')
    if j[1] ~= 'queued' and j[1] ~= 'running' then
      redis.call('HDEL', KEYS[16], id)
      local ukey = string.sub(state, 2)
      local tenant, user = string.match(ukey, '^([^%z]*)%z(.*)$')
      if not j[1] and tenant then
        local s = string.sub(state, 1, 1)
        counts_add(ARGV[14] .. tenant .. ':' .. user .. ':counts', s == 'r' and 'running' or 'queued', -1)
        if s == 'q' and redis.call('HINCRBY', KEYS[17], ukey, -1) <= 0 then redis.call('HDEL', KEYS[17], ukey) end
      end
    elseif not j[2] then
      redis.call('HDEL', KEYS[16], id) -- not a queued job's record: nothing to look for
    elseif not (redis.call('ZSCORE', KEYS[1], j[2]) or redis.call('ZSCORE', KEYS[2], j[2]) or
        redis.call('ZSCORE', KEYS[9], id) or redis.call('ZSCORE', KEYS[13], id) or redis.call('ZSCORE', KEYS[20], id)) then
      if j[6] then
        redis.call('ZADD', KEYS[9], 'NX', now + lease_ms, id)
      else
        back_to_queue(j[2], tonumber(j[3]), intstr(j[4]) .. ',' .. intstr(j[5]))
      end
    end
  end
end
sweep()

local st = lim_load(KEYS[7], now, cfg)
-- Why the round stops (state) and the wait it answers (ms), the jobs it
-- picked, and the model a jobless probe asks about.
local state, ms, picks, probe_model = '', 0, {}, ''
local picked = 0
-- V, the start tag of the last job dispatched, one per class (see
-- prelude.lua): v interactive, vb background. A lost one is taken as the
-- tag of its class's first waiting job (and stored again).
local v0 = tonumber(redis.call('GET', KEYS[3]))
-- (One in background space was set by a dispatcher of a release before
-- classes that dispatched a background job: taken as lost.)
if v0 and v0 >= BG then v0 = nil end
local v = v0
if not v then
  v, v0 = class_head(KEYS[1], false) or 0, -1
end
local vb0 = tonumber(redis.call('GET', KEYS[19]))
local vb = vb0
if not vb then
  vb, vb0 = class_head(KEYS[1], true) or BG, -1
end

-- Outage: nothing is dispatched but one probe at a time, when it is due.
-- An outage that outlasted its limit sends the waiting jobs, a batch a
-- round, to the expiring set, where the dispatcher fails them.
local probing = false
if st.down > 0 then
  local hv = redis.call('HMGET', KEYS[7], 'probe', 'probe_at')
  local probe = hv[1] or ''
  local free_until = tonumber(string.match(probe, '^#(%d+)$'))
  if (free_until and now >= free_until) or (probe ~= '' and not free_until and not redis.call('ZSCORE', KEYS[9], probe)) then
    -- The probe's call ended without a word on the upstream (its job was
    -- canceled, its worker died, or a jobless probe was never reported):
    -- another may go.
    probe = ''
    redis.call('HSET', KEYS[7], 'probe', '')
  end
  if st.down_fail > 0 and now >= st.down_fail then
    -- (A deadline entry of now keeps each until it has ended: see above.)
    for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, 99)) do
      leave_queue(member)
      redis.call('ZADD', KEYS[13], now, string.match(member, '|(.*)$'))
      redis.call('ZADD', KEYS[12], 'NX', now, member)
    end
    for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, 99)) do
      leave_retry(member)
      redis.call('ZADD', KEYS[13], now, string.match(member, '|(.*)$'))
      redis.call('ZADD', KEYS[12], 'NX', now, member)
    end
  end
  local at = num(hv[2], now)
  if probe ~= '' then
    state, ms = 'down', 5000 -- woken when the probe's attempt ends
  elseif now < at then
    state, ms = 'down', at - now
  else
    probing = true
    max_pick = 1
  end
end

-- Cache-aware dispatch. A job whose prompt-cache prefix the upstream is
-- known to hold reserves only its uncached input (reads are free). A job
-- with a cacheable prefix not known to be cached, while another job's call
-- that will write that prefix is in flight, is held: it keeps its place
-- and the round looks past it, until that call's answer begins (the
-- worker records the prefix as cached and wakes the dispatchers) or the
-- hold's time is up. A job dispatched with such a prefix and no writer in
-- flight becomes the writer. A writer whose answer never began leaves the
-- prefix unheld for a minute, so a slow upstream cannot chain holds.
local skip, held, hold_until = 0, 0, nil
local held_ids = {} -- the jobs counted in held

-- Service classes. Interactive jobs sort first, so the head of the order
-- is interactive whenever one waits. Background keeps a minimum share
-- (ARGV[18]) of the dispatches made while background jobs waited, counted
-- in requests over this minute and the previous one (rate fields
-- w<minute>: dispatches while background waited, b<minute>: background
-- dispatches): while interactive jobs also wait and background is owed a
-- whole dispatch of its share, the next pick is the first background job
-- instead (its own scan past held jobs: skip_b). Counting only the
-- dispatches made while background waited means a background job that
-- arrives after a busy interactive minute is owed nothing yet, rather than
-- a burst. bg_done: no background job can go in this round.
local min_share = tonumber(ARGV[18]) or 0
local minute = math.floor(now / 60000)
local rt = redis.call('HMGET', KEYS[15], 'w' .. minute, 'w' .. (minute - 1), 'b' .. minute, 'b' .. (minute - 1))
local n_all, n_bg = num(rt[1], 0) + num(rt[2], 0), num(rt[3], 0) + num(rt[4], 0)
local skip_b, bg_done, picked_b, picked_w = 0, min_share <= 0, 0, 0
local HOLD_SCAN = 200 -- held jobs a round looks past, at most

-- cache_plan reads a job's prefixes: the tokens known cached, whether it
-- must be held (and until when), and the prefixes it would write.
local function cache_plan(id, cpre)
  local ps = cache_prefixes(cpre)
  if #ps == 0 then return 0, nil, nil end
  local cached = 0
  if not count_reads then cached = cache_cached(KEYS[18], ps, now + 2000) end
  if hold_ms <= 0 then return cached, nil, nil end
  local until_, writes = nil, {}
  for _, p in ipairs(ps) do
    if p.tokens > cached and (tonumber(redis.call('HGET', KEYS[18], 'n:' .. p.h)) or 0) <= now then
      local w = redis.call('HGET', KEYS[18], 'w:' .. p.h)
      local wid, wat = string.match(w or '', '^([^,]*),(%d+)$')
      wat = tonumber(wat)
      if not wat or wid == id or (wid == '!' and wat <= now) then
        writes[#writes + 1] = p.h
      elseif wat <= now then
        -- The writer's answer never began in time: no holding for a while.
        redis.call('HSET', KEYS[18], 'w:' .. p.h, '!,' .. intstr(now + 60000))
      elseif wid ~= '!' then
        if not until_ or wat < until_ then until_ = wat end
      end
    end
  end
  return cached, until_, writes
end

while state == '' do
  if picked >= max_pick then
    state, ms = 'more', 0
    break
  end
  if st.frozen > now then
    state, ms = 'wait', st.frozen - now
    break
  end
  if redis.call('ZCARD', KEYS[9]) >= max_conc then
    local first = redis.call('ZRANGE', KEYS[9], 0, 0, 'WITHSCORES')
    state, ms = 'full', math.max(1, tonumber(first[2]) - now)
    break
  end
  local head, from_bg = nil, false
  if not bg_done and n_bg + 1 <= min_share * (n_all + 1) + 1e-9 then
    if skip_b < HOLD_SCAN and class_head(KEYS[1], false) then
      head = redis.call('ZRANGEBYSCORE', KEYS[1], BG, '+inf', 'WITHSCORES', 'LIMIT', skip_b, 1)
      from_bg = #head > 0
    end
    if not from_bg then bg_done = true end
  end
  if not from_bg then head = redis.call('ZRANGE', KEYS[1], skip, skip, 'WITHSCORES') end
  if not from_bg and (#head == 0 and skip > 0 or skip >= HOLD_SCAN) then
    state, ms = 'hold', math.max(1, hold_until - now)
    local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if #d > 0 then ms = math.max(1, math.min(ms, tonumber(d[2]) - now)) end
    break
  end
  if #head == 0 then
    local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if probing and #d == 0 then
      -- A probe is due and no job waits to be it (the outage outlasted its
      -- limit and the queue was failed, or nobody asked): the dispatcher
      -- probes without a job, with the free count_tokens call, and reports.
      redis.call('HSET', KEYS[7], 'probe', '#' .. (now + lease_ms))
      state, ms = 'probe', 5000
      probe_model = redis.call('HGET', KEYS[7], 'probe_model') or ''
      break
    end
    state, ms = 'empty', -1
    if #d > 0 then ms = math.max(1, tonumber(d[2]) - now) end
    break
  end
  local member, tag = head[1], tonumber(head[2])
  local id = string.match(member, '|(.*)$')
  local rec = redis.call('HMGET', jkey(id), 'status', 'cost_in', 'cost_out', 'fq_member', 'c_pre')
  -- A cost entry lost since the repair above reads the record's.
  local cin, cout = split2(redis.call('HGET', KEYS[5], member) or (intstr(rec[2]) .. ',' .. intstr(rec[3])))
  cin, cout = cin or 0, cout or 0
  local status = rec[1]
  -- A member whose record is gone (or names another member) is dropped.
  local live = (status == 'queued' or status == 'running') and rec[4] == member
  local reserved = live and redis.call('HEXISTS', KEYS[8], id) == 1
  local cached, until_, writes = 0, nil, nil
  if live and not reserved and rec[5] then
    cached, until_, writes = cache_plan(id, rec[5])
  end
  if until_ then
    -- Held for a cache write: it keeps its place; look past it.
    -- (A background job can be looked past by both scans: count it once.)
    if from_bg then skip_b = skip_b + 1 else skip = skip + 1 end
    if not held_ids[id] then held_ids[id], held = true, held + 1 end
    if not hold_until or until_ < hold_until then hold_until = until_ end
  else
    if live and not reserved then
      -- Input read from the cache does not count: reserve the rest.
      cin = math.max(1, cin - cached)
      -- Output counted as produced: hold what the call is expected to
      -- produce, not max_tokens (kept, fourth, for the output ratio).
      local maxout = cout
      if produced then cout = expected_out(st, cout) end
      local nr, ni, no = need(1, st.cr), need(cin, st.ci), need(cout, st.co)
      if st.r < nr or st.i < ni or st.o < no then
        state = 'wait'
        ms = math.max(1, math.ceil(math.max(wait_ms(nr, st.r, st.rr), wait_ms(ni, st.i, st.ri), wait_ms(no, st.o, st.ro))))
        break
      end
      st.r, st.i, st.o = st.r - 1, st.i - cin, st.o - cout
      redis.call('HSET', KEYS[8], id, '1,' .. intstr(cin) .. ',' .. intstr(cout) .. ',' .. intstr(maxout))
      for _, h in ipairs(writes or {}) do
        redis.call('HSET', KEYS[18], 'w:' .. h, id .. ',' .. intstr(now + hold_ms))
      end
    end
    -- Out of the queue: dispatched, or dropped when it was canceled while
    -- queued (or its record expired).
    leave_queue(member)
    if live then
      if tag >= BG then
        if tag > vb then vb = tag end
        n_bg, picked_b = n_bg + 1, picked_b + 1
      elseif tag > v then
        v = tag
      end
      if min_share > 0 and (tag >= BG or class_head(KEYS[1], true)) then
        n_all, picked_w = n_all + 1, picked_w + 1
      end
      redis.call('ZADD', KEYS[9], now + lease_ms, id)
      redis.call('HDEL', jkey(id), 'lease_grace')
      local n = redis.call('HINCRBY', jkey(id), 'dispatch', 1)
      if n == 1 then
        -- The first dispatch's time and place in the group's dispatch order.
        redis.call('HSET', jkey(id), 'dispatched_at', now, 'dispatch_seq', redis.call('INCR', KEYS[14]))
      end
      redis.call('ZADD', KEYS[10], now, id .. '|' .. n)
      picks[#picks + 1] = {'job', id, 'dispatch', n}
      picked = picked + 1
      if probing then
        redis.call('HSET', KEYS[7], 'probe', id)
        state, ms = 'down', 5000
      end
    end
  end -- not held
end
redis.call('HSET', KEYS[7], 'held', held)
-- Forget the cache entries that ran out, once a minute when there are many.
if redis.call('HLEN', KEYS[18]) > 256 and now - num(redis.call('HGET', KEYS[7], 'cache_gc'), 0) > 60000 then
  redis.call('HSET', KEYS[7], 'cache_gc', intstr(now))
  local all = redis.call('HGETALL', KEYS[18])
  for k = 1, #all, 2 do
    local at = tonumber(string.match(all[k + 1], '(%d+)$'))
    if not at or at <= now then redis.call('HDEL', KEYS[18], all[k]) end
  end
end
if vb > vb0 then
  redis.call('SET', KEYS[19], tagstr(vb))
  redis.call('ZREMRANGEBYSCORE', KEYS[4], BG, vb)
end
if v > v0 then
  redis.call('SET', KEYS[3], tagstr(v))
  -- Finish tags at or below V no longer matter: max(V, F) is V.
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', v)
end
lim_save(st)
-- Wake for the next deadline too (past ones wait in the expiring set).
local dl = redis.call('ZRANGEBYSCORE', KEYS[12], '(' .. intstr(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #dl > 0 then
  local d = math.max(1, tonumber(dl[2]) - now)
  if state ~= 'more' and (ms < 0 or d < ms) then ms = d end
end
ms = math.floor(ms)
local expiring = redis.call('ZCARD', KEYS[13])
if moved > 0 then redis.call('PUBLISH', ARGV[10], moved) end
if picked > 0 then
  redis.call('HINCRBY', KEYS[15], minute, intstr(picked))
  redis.call('HDEL', KEYS[15], minute - 5)
end
if picked_b > 0 then
  redis.call('HINCRBY', KEYS[15], 'b' .. minute, intstr(picked_b))
  redis.call('HDEL', KEYS[15], 'b' .. (minute - 5))
end
if picked_w > 0 then
  redis.call('HINCRBY', KEYS[15], 'w' .. minute, intstr(picked_w))
  redis.call('HDEL', KEYS[15], 'w' .. (minute - 5))
end
return {'state', state, 'wait_ms', ms, 'expiring', expiring, 'jobs', picks, 'probe_model', probe_model}
