-- lifecycle.lua: every change of a job after its admission, in one atomic
-- step: its record and status, its owner's counts, its place in the fair
-- queue (left, or back for a retry), its limiter reservation and lease, its
-- hold on its user's quota, the usage statistics, and the event that tells
-- its followers. A crash or a Redis error can never leave half of one.
--
-- Checks come before any write, so a refused step changes nothing:
--   * the job exists (NOTFOUND), its status is one of plan.from
--     (STATE <status>), and, when plan.dispatch > 0, it is at that dispatch
--     (SUPERSEDED: its lease was lost and it was dispatched again);
--   * plan.open = d starts attempt d (refused with RUNNING when attempt d is
--     already open: asynq delivered the task twice; with NOATTEMPT when the
--     job is back in line: its retry queue, order or expiring set);
--   * plan.close = d ends the open attempt d (refused with NOATTEMPT when it
--     is not open: the attempt was ended already). Each attempt ends once,
--     so its settlement and statistics count once. plan.salvage lets an
--     answer end it even when a dispatcher found its lease expired and put
--     the job back in line (Redis was away), as long as the job was not
--     dispatched again (its reservation is still held): the answer is
--     kept rather than bought again.
--
-- Settlement: when no upstream call of the job is running after the step
-- (no attempt stays open), the limiter reservation of its current dispatch
-- is closed with plan.used (refunding what the upstream did not count), its
-- lease released, and, when the new status is terminal, its hold on its
-- user's quota taken out of the record and answered, for the caller to
-- give back what was not used in the user's slot (lua/quota.lua). A job
-- canceled while its call runs keeps both until the worker ends that attempt (plan.close), with what it used;
-- the step announces the cancel on plan.cancel so the worker stops at once.
--
-- Queue: a terminal status with no call running takes the job out of the
-- fair queue, its retry wait and the expiring set; plan.requeue = ms puts it
-- back at its original start tag, due after that delay (a retry).
--
-- KEYS[1] job hash   KEYS[2] job events   KEYS[3] owner's counts
-- KEYS[4] the group's waiting users   KEYS[5] limiter state
-- KEYS[6] reservations   KEYS[7] leases
-- KEYS[8] the group's use per minute   KEYS[9] order   KEYS[10] costs
-- KEYS[11] totals   KEYS[12] deadlines   KEYS[13] delayed
-- KEYS[14] delayed tags   KEYS[15] expiring
-- KEYS[16] the group's live jobs (see dispatch.lua's sweep)
-- KEYS[17] the group's jobs in batches (lua/batch.lua), which a job leaves
--   once no call of it runs and it ends or goes back in line
-- ARGV[1] now ms (0 = Redis TIME)
-- ARGV[2] plan, JSON: {from = [status], to, dispatch, open, close, event,
--   channel, ttl, maxlen, used = [requests, input, output], dur (ms of a
--   completed call, 0 = none), lim = [rpm, itpm, otpm, burst ms],
--   requeue (ms), tallies =
--   [{k, f, z, n, t}], wake, moved, cancel,
--   health = {after, window, probe_min, probe_max, max_outage, jitter}: the
--   attempt failed for a reason of the upstream's own (see health_fail),
--   deadline (ms): the job's deadline, which ends an outage's wait}
-- ARGV[3] event data (JSON text; "__ATTEMPTS__", quoted, becomes the
--   attempt count)
-- ARGV[4..] field, value pairs to set; a field named "?name" only if absent
-- Reply: name, value pairs (scheduler's lifecycleOut): "event" id or "",
--   "attempts", "limiter" settled 0|1, "quota" hold taken 0|1, "from" the
--   status before the step, "health" the group's health after it: "entered"
--   (this step began an outage), "down" or "", and "hold" the hold taken
--   (quota_held's pairs; none: empty)
local now = clock(ARGV[1])
local p = cjson.decode(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'status', 'dispatch', 'attempt_open', 'fq_member',
  'fq_tag', 'cost_in', 'cost_out', 'group', 'tenant', 'user_id', 'attempts', 'via')
local cur = h[1]
if not cur then return redis.error_reply('NOTFOUND') end
local allowed = false
for _, s in ipairs(p.from) do
  if s == cur then allowed = true end
end
if not allowed then return redis.error_reply('STATE ' .. cur) end
local dispatch = tonumber(h[2]) or 0
if (p.dispatch or 0) > 0 and dispatch ~= p.dispatch then return redis.error_reply('SUPERSEDED') end
local open = tonumber(h[3]) or 0
-- The dispatch's limiter reservation is held from the dispatch until its
-- attempt ends (or a dispatcher finds its lease expired and the job is
-- dispatched again): without it, the attempt has ended already.
local reserved = (p.dispatch or 0) > 0 and redis.call('HEXISTS', KEYS[6], p.id) == 1
if p.close and open ~= p.close and not (p.salvage and reserved) then return redis.error_reply('NOATTEMPT') end
if p.open and open == p.open then return redis.error_reply('RUNNING') end
-- An attempt starts only while its dispatch is out of line: a job back in
-- line (a retry ended this dispatch's attempt, its lease was found expired,
-- or it waits to expire) is dispatched anew first. Its reservation is not
-- asked for: a lost reservations key must not keep dispatched jobs from
-- starting (the attempt then settles nothing).
if p.open and ((h[4] and (redis.call('ZSCORE', KEYS[9], h[4]) or redis.call('ZSCORE', KEYS[13], h[4])))
    or redis.call('ZSCORE', KEYS[15], p.id)) then
  return redis.error_reply('NOATTEMPT')
end

local to = p.to
local terminal = to == 'succeeded' or to == 'failed' or to == 'canceled' or to == 'expired'
local ttl = tonumber(p.ttl) or 0

-- log appends an event to the job's log and publishes it.
local function log(name, data)
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', intstr(p.maxlen), '*', 'event', name, 'data', data)
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], intstr(ttl)) end
  redis.call('PUBLISH', p.channel, '{"id":"' .. id .. '","event":"' .. name .. '","data":' .. data .. '}')
  return id
end

-- The record, the owner's counts and the group's waiting users (both
-- floored at 0: see counts_add).
redis.call('HSET', KEYS[1], 'status', to)
if cur ~= to then
  if cur == 'queued' or cur == 'running' then counts_add(KEYS[3], cur, -1) end
  if to == 'queued' or to == 'running' then counts_add(KEYS[3], to, 1) end
  if (cur == 'queued' or to == 'queued') and h[9] and h[10] then
    local u = h[9] .. '\0' .. h[10]
    if to == 'queued' then
      redis.call('HINCRBY', KEYS[4], u, 1)
    elseif redis.call('HINCRBY', KEYS[4], u, -1) <= 0 then
      redis.call('HDEL', KEYS[4], u)
    end
  end
  if terminal then
    redis.call('HDEL', KEYS[16], p.id)
  elseif (to == 'queued' or to == 'running') and h[9] and h[10] then
    redis.call('HSET', KEYS[16], p.id, live_state(to, h[9], h[10]))
  end
end
local attempts = tonumber(h[11]) or 0
if p.open then
  if open > 0 then
    -- An earlier attempt was never ended (its worker died before its lease
    -- was found expired): say so before the new one starts.
    log('retrying', '{"attempt":' .. attempts .. ',"reason":"worker_lost","retry_in_seconds":0}')
  end
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'attempt_open', p.open)
  open = p.open
end
if p.close then
  redis.call('HDEL', KEYS[1], 'attempt_open')
  open = 0
end
for i = 4, #ARGV, 2 do
  local f = ARGV[i]
  if string.sub(f, 1, 1) == '?' then
    redis.call('HSETNX', KEYS[1], string.sub(f, 2), ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  end
end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], intstr(ttl)) end

-- The group's health: a failure of the upstream's own. While the group is
-- in outage a retry waits for no delay: dispatch holds it (at the front of
-- its lane) until the upstream is back; its deadline, if it has one, ends
-- the wait.
local health = ''
if p.health then
  health = health_fail(KEYS[5], now, p.health, p.id)
  -- The model a jobless probe asks about (see dispatch.lua).
  local model = redis.call('HGET', KEYS[1], 'model')
  if model then redis.call('HSET', KEYS[5], 'probe_model', model) end
  if health ~= '' and p.requeue then p.requeue = 0 end
  if h[4] and p.deadline then redis.call('ZADD', KEYS[12], p.deadline, h[4]) end
end

-- The fair queue.
local member = h[4]
local moved = false
if member and terminal and open == 0 then
  if fq_leave(KEYS[9], KEYS[10], KEYS[11], KEYS[12], member) then moved = true end
  if redis.call('ZREM', KEYS[13], member) == 1 then redis.call('HDEL', KEYS[14], member) end
  redis.call('ZREM', KEYS[15], p.id)
end
if h[12] == 'batch' and open == 0 and (terminal or p.requeue) then redis.call('ZREM', KEYS[17], p.id) end
if member and p.requeue then
  redis.call('ZADD', KEYS[13], now + p.requeue, member)
  redis.call('HSET', KEYS[14], member, (h[5] or '0') .. ';' .. (h[6] or '0') .. ',' .. (h[7] or '0'))
end

-- Settlement, when no call of the job runs any more.
local lim_settled, held = 0, nil
-- A concurrency slot freed wakes the dispatchers even when the reservation
-- was lost with its key.
local released = false
if open == 0 then
  released = redis.call('ZREM', KEYS[7], p.id) == 1
  local used = p.used or {0, 0, 0}
  if settle_limiter(KEYS[5], KEYS[6], KEYS[7], KEYS[8], now, p.lim, p.id, used, tonumber(p.dur) or 0) then
    lim_settled = 1
  end
end

-- Statistics, bumped exactly when the step happens (the job's cost among
-- them, which the settlement below reads).
for _, t in ipairs(p.tallies or {}) do
  if t.z then
    redis.call('ZINCRBY', t.k, intstr(t.n), t.f)
  else
    redis.call('HINCRBY', t.k, t.f, intstr(t.n))
  end
  if (tonumber(t.t) or 0) > 0 then redis.call('EXPIRE', t.k, intstr(t.t)) end
end
if open == 0 and terminal then held = quota_held(KEYS[1]) end

local id = ''
if p.event and p.event ~= '' then
  local data = string.gsub(ARGV[3], '"__ATTEMPTS__"', tostring(attempts))
  id = log(p.event, data)
end
if terminal and open > 0 and p.cancel then redis.call('PUBLISH', p.cancel, p.id) end
if (moved or health == 'entered') and p.moved then redis.call('PUBLISH', p.moved, 1) end
if p.wake and (lim_settled == 1 or released or p.requeue or moved) then redis.call('PUBLISH', p.wake, to) end
return {'event', id, 'attempts', attempts, 'limiter', lim_settled, 'quota', held and 1 or 0, 'from', cur,
  'health', health, 'hold', held or {}}
