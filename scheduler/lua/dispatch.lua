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
-- ARGV[1] now ms (0 = Redis TIME)  ARGV[2..5] rpm, input_tpm, output_tpm, burst ms
-- ARGV[6] max concurrency   ARGV[7] lease ms   ARGV[8] most jobs to pick
-- ARGV[9] job hash key prefix ("sluice:job:")   ARGV[10] moved channel
-- ARGV[11] job event channel prefix   ARGV[12] event log max length
-- ARGV[13] ms: a longer gap between two rounds means the dispatchers (or
--   Redis) were away
-- Reply: {state, ms, expiring, job id 1, dispatch 1, job id 2, dispatch 2, ...}
--   expiring: how many jobs wait in the expiring set
--   state "more"  the pick limit was reached: call again at once
--         "wait"  the next job fits in ms (limiter or freeze)
--         "full"  every concurrency slot is taken; the first lease ends in ms
--         "empty" nothing queued; the next retry is due in ms (-1: none)
--         "down"  the group is in outage; the next probe may go in ms (the
--                 one job picked, if any, is the probe)
--         "probe" the group is in outage, a probe is due and no job waits
--                 to be it: the caller probes without a job (the model to
--                 ask about in the fourth place) and reports the outcome
--   (a queued job's deadline coming sooner shortens ms)
-- Jobs whose deadline passed leave the queue for the expiring set, where the
-- dispatcher expires them; jobs canceled while queued are dropped.
local now = clock(ARGV[1])
local cfg = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local max_conc, lease_ms, max_pick, prefix = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
-- moved counts jobs that entered or left the order: waiting jobs' positions
-- changed, and the api processes following them are told (ARGV[10]).
local moved = 0

-- totals_add keeps the queue's job count and estimated tokens (for etas).
local function totals_add(sign, cin, cout)
  redis.call('HINCRBY', KEYS[6], 'n', sign)
  redis.call('HINCRBY', KEYS[6], 'in', sign * cin)
  redis.call('HINCRBY', KEYS[6], 'out', sign * cout)
end

local function back_to_queue(member, tag, cost)
  moved = moved + 1
  redis.call('ZADD', KEYS[1], tag, member)
  redis.call('HSET', KEYS[5], member, cost)
  totals_add(1, split2(cost))
end

local function leave_queue(member)
  local left = fq_leave(KEYS[1], KEYS[5], KEYS[6], KEYS[12], member)
  if left then moved = moved + 1 end
  return left
end

-- Retries whose delay is over.
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local tc = redis.call('HGET', KEYS[11], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[11], member)
  if tc then
    local tag, cost = string.match(tc, '^([^;]*);(.*)$')
    back_to_queue(member, tonumber(tag), cost)
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

-- Leases whose holder stopped renewing: the worker died mid-call. A job
-- whose attempt had started gets a `retrying` event (reason worker_lost):
-- its followers discard that attempt's text, as after any retry.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now)) do
  redis.call('ZREM', KEYS[9], id)
  local j = redis.call('HMGET', prefix .. id, 'status', 'fq_member', 'fq_tag', 'cost_in', 'cost_out',
    'attempt_open', 'attempts')
  if (j[1] == 'queued' or j[1] == 'running') and j[2] then
    if j[6] then
      redis.call('HDEL', prefix .. id, 'attempt_open')
      local data = '{"attempt":' .. (j[7] or '0') .. ',"reason":"worker_lost","retry_in_seconds":0}'
      local ev = redis.call('XADD', prefix .. id .. ':events', 'MAXLEN', '~', ARGV[12], '*',
        'event', 'retrying', 'data', data)
      redis.call('PUBLISH', ARGV[11] .. id, '{"id":"' .. ev .. '","event":"retrying","data":' .. data .. '}')
    end
    if not redis.call('ZSCORE', KEYS[1], j[2]) then
      back_to_queue(j[2], tonumber(j[3]), j[4] .. ',' .. j[5])
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
-- waited out an outage).
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[12], '-inf', now)) do
  local left = leave_queue(member)
  if leave_retry(member) then left = true end
  if left then
    redis.call('ZADD', KEYS[13], now, string.match(member, '|(.*)$'))
  end
end

local st = lim_load(KEYS[7], now, cfg)
local out = {'', 0, 0}
local picked = 0
local v = num(redis.call('GET', KEYS[3]), 0)
local v0 = v

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
    for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, 99)) do
      leave_queue(member)
      redis.call('ZADD', KEYS[13], now, string.match(member, '|(.*)$'))
    end
    for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, 99)) do
      leave_retry(member)
      redis.call('ZADD', KEYS[13], now, string.match(member, '|(.*)$'))
    end
  end
  local at = num(hv[2], now)
  if probe ~= '' then
    out[1], out[2] = 'down', 5000 -- woken when the probe's attempt ends
  elseif now < at then
    out[1], out[2] = 'down', at - now
  else
    probing = true
    max_pick = 1
  end
end

while out[1] == '' do
  if picked >= max_pick then
    out[1], out[2] = 'more', 0
    break
  end
  if st.frozen > now then
    out[1], out[2] = 'wait', st.frozen - now
    break
  end
  if redis.call('ZCARD', KEYS[9]) >= max_conc then
    local first = redis.call('ZRANGE', KEYS[9], 0, 0, 'WITHSCORES')
    out[1], out[2] = 'full', math.max(1, tonumber(first[2]) - now)
    break
  end
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #head == 0 then
    local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if probing and #d == 0 then
      -- A probe is due and no job waits to be it (the outage outlasted its
      -- limit and the queue was failed, or nobody asked): the dispatcher
      -- probes without a job, with the free count_tokens call, and reports.
      redis.call('HSET', KEYS[7], 'probe', '#' .. (now + lease_ms))
      out[1], out[2] = 'probe', 5000
      out[4] = redis.call('HGET', KEYS[7], 'probe_model') or ''
      break
    end
    out[1], out[2] = 'empty', -1
    if #d > 0 then out[2] = math.max(1, tonumber(d[2]) - now) end
    break
  end
  local member, tag = head[1], tonumber(head[2])
  local id = string.match(member, '|(.*)$')
  local cost = redis.call('HGET', KEYS[5], member) or '0,0'
  local cin, cout = split2(cost)
  local status = redis.call('HGET', prefix .. id, 'status')
  local live = status == 'queued' or status == 'running'
  if live and redis.call('HEXISTS', KEYS[8], id) == 0 then
    local nr, ni, no = need(1, st.cr), need(cin, st.ci), need(cout, st.co)
    if st.r < nr or st.i < ni or st.o < no then
      out[1] = 'wait'
      out[2] = math.max(1, math.ceil(math.max(wait_ms(nr, st.r, st.rr), wait_ms(ni, st.i, st.ri), wait_ms(no, st.o, st.ro))))
      break
    end
    st.r, st.i, st.o = st.r - 1, st.i - cin, st.o - cout
    redis.call('HSET', KEYS[8], id, '1,' .. cin .. ',' .. cout)
  end
  -- Out of the queue: dispatched, or dropped when it was canceled while
  -- queued (or its record expired).
  leave_queue(member)
  if live then
    if tag > v then v = tag end
    redis.call('ZADD', KEYS[9], now + lease_ms, id)
    local n = redis.call('HINCRBY', prefix .. id, 'dispatch', 1)
    if n == 1 then
      -- The first dispatch's time and place in the group's dispatch order.
      redis.call('HSET', prefix .. id, 'dispatched_at', now, 'dispatch_seq', redis.call('INCR', KEYS[14]))
    end
    redis.call('ZADD', KEYS[10], now, id .. '|' .. n)
    out[#out + 1] = id
    out[#out + 1] = n
    picked = picked + 1
    if probing then
      redis.call('HSET', KEYS[7], 'probe', id)
      out[1], out[2] = 'down', 5000
    end
  end
end
if v > v0 then
  redis.call('SET', KEYS[3], tostring(v))
  -- Finish tags at or below V no longer matter: max(V, F) is V.
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', v)
end
lim_save(st)
-- Wake for the next deadline too.
local dl = redis.call('ZRANGE', KEYS[12], 0, 0, 'WITHSCORES')
if #dl > 0 then
  local d = math.max(1, tonumber(dl[2]) - now)
  if out[1] ~= 'more' and (out[2] < 0 or d < out[2]) then out[2] = d end
end
out[2] = math.floor(out[2])
out[3] = redis.call('ZCARD', KEYS[13])
if moved > 0 then redis.call('PUBLISH', ARGV[10], moved) end
if picked > 0 then
  local minute = math.floor(now / 60000)
  redis.call('HINCRBY', KEYS[15], minute, picked)
  redis.call('HDEL', KEYS[15], minute - 5)
end
return out
