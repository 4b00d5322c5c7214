-- batch.lua: a model group's jobs that go by the Message Batches API.
--
-- A job admitted for a batch waits in the group's batch line (KEYS[1], by
-- admission time) and, due at its fallback time, among the retry waits
-- (KEYS[2], with its start tag in KEYS[3]): whichever comes first takes it,
-- a batch (op take) or the Messages line (a dispatch round finds the retry
-- due). Taken for a batch, it leaves both, is running, and is held by a
-- claim (KEYS[7]: claim id -> {at, check, jobs = [[id, dispatch], ...]})
-- until the upstream has created the batch; the claim then becomes the
-- batch's entry (KEYS[8]: batch id -> {jobs, next, wait, claim, cancel},
-- or for an adopted batch {adopted = 1, claims, next, wait}).
-- KEYS[9] (the group's jobs in batches, id -> taken at) is what the
-- dispatch round's safety net counts them in.
--
-- KEYS[1] batch line   KEYS[2] delayed   KEYS[3] delayed tags
-- KEYS[4] deadlines   KEYS[5] the group's waiting users
-- KEYS[6] the group's live jobs   KEYS[7] claims   KEYS[8] batches
-- KEYS[9] jobs in batches
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] op   ARGV[3] key prefix (a job's
-- record is jkey(id))   ARGV[4] the group's user key prefix
-- Ops (their arguments from ARGV[5]), each replying name, value pairs
-- (scheduler's batch*Out):
--   take window_ms max_jobs claim_id: when the line's first job has waited
--     window_ms or max_jobs wait, take up to max_jobs under a new claim.
--     Reply {"state", "empty"} | {"state", "wait", "wait_ms", ms} |
--     {"state", "take", "jobs", {{"job", id, "dispatch", n}, ...}}
--   record claim_id batch_id poll_ms: the upstream created the batch.
--     Reply {"result", "ok" | "gone" (no such claim)}
--   return claim_id: the claim's jobs not in a batch wait in the line
--     again (the batch was not created, or not with them). Reply
--     {"returned", n}
--   due check_ms poll_max_ms: batches whose check is due (their next check
--     pushed back, the wait doubled) and claims left unrecorded check_ms
--     after they were made. Reply {"batches", {{"id", batch id, "entry",
--     entry JSON}, ...}, "claims", {{"id", claim id, "entry", claim JSON},
--     ...}}
--   adopt claim_id batch_id poll_ms: a batch found upstream that may hold
--     the claim's jobs (its worker died before recording it); one batch
--     may be adopted for several claims. Reply {"result", "ok" | "gone" |
--     "known" (a recorded batch: another claim's)}
--   cancel batch_id: mark the batch as asked to cancel. Reply {"marked",
--     0|1: it was not marked before}
--   done batch_id: the batch's results are all in. Reply {"done", 1}
--   running batch_id: how many of its jobs still run. Reply {"running", n}
local now = clock(ARGV[1])
local op, prefix, uprefix = ARGV[2], ARGV[3], ARGV[4]
local function jkey(id) return prefix .. '{' .. string.sub(id, 5, 7) .. '}:job:' .. id end

-- counts_move moves a job of tenant\0user from one status count to another.
local function counts_move(tenant, user, from, to)
  local k = uprefix .. tenant .. ':' .. user .. ':counts'
  counts_add(k, from, -1)
  counts_add(k, to, 1)
end

if op == 'take' then
  local window, max_jobs, claim = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
  local n = redis.call('ZCARD', KEYS[1])
  if n == 0 then return {'state', 'empty'} end
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local ready = tonumber(first[2]) + window
  if n < max_jobs and ready > now then return {'state', 'wait', 'wait_ms', ready - now} end
  local out, taken = {}, {}
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, max_jobs - 1)) do
    redis.call('ZREM', KEYS[1], member)
    local id = string.match(member, '|(.*)$')
    local j = redis.call('HMGET', jkey(id), 'status', 'fq_member', 'tenant', 'user_id')
    -- Only a job still waiting for its batch: one that was canceled, or
    -- whose fallback time came first (it left the retry waits for the
    -- Messages line), is the Messages line's or nobody's.
    if j[1] == 'queued' and j[2] == member and redis.call('ZREM', KEYS[2], member) == 1 then
      redis.call('HDEL', KEYS[3], member)
      redis.call('ZREM', KEYS[4], member)
      local d = redis.call('HINCRBY', jkey(id), 'dispatch', 1)
      redis.call('HSET', jkey(id), 'status', 'running', 'via', 'batch', 'batch_claim', claim)
      redis.call('HSETNX', jkey(id), 'dispatched_at', intstr(now))
      counts_move(j[3], j[4], 'queued', 'running')
      local u = j[3] .. '\0' .. j[4]
      if redis.call('HINCRBY', KEYS[5], u, -1) <= 0 then redis.call('HDEL', KEYS[5], u) end
      redis.call('HSET', KEYS[6], id, live_state('running', j[3], j[4]))
      redis.call('ZADD', KEYS[9], now, id)
      out[#out + 1] = {'job', id, 'dispatch', d}
      taken[#taken + 1] = {id, d}
    end
  end
  if #taken > 0 then
    redis.call('HSET', KEYS[7], claim, cjson.encode({at = now, check = now, jobs = taken}))
  end
  return {'state', 'take', 'jobs', out}
end

if op == 'record' or op == 'adopt' then
  local claim, bid, poll = ARGV[5], ARGV[6], tonumber(ARGV[7])
  local c = redis.call('HGET', KEYS[7], claim)
  if not c then return {'result', 'gone'} end
  c = cjson.decode(c)
  local entry = {jobs = c.jobs, next = now + poll, wait = poll, claim = claim, cancel = 0}
  local prev = redis.call('HGET', KEYS[8], bid)
  if op == 'adopt' then
    -- Which of the claims' jobs the batch holds shows in its results: it
    -- may be any lost claim's of about its time.
    if prev then
      entry = cjson.decode(prev)
      if entry.adopted ~= 1 then return {'result', 'known'} end
    else
      entry.adopted, entry.jobs, entry.claims = 1, {}, {}
    end
    for _, x in ipairs(entry.claims) do
      if x == claim then return {'result', 'ok'} end
    end
    entry.claims[#entry.claims + 1] = claim
    c.adopted_ids = c.adopted_ids or {}
    c.adopted_ids[#c.adopted_ids + 1] = bid
    redis.call('HSET', KEYS[7], claim, cjson.encode(c))
  elseif prev then
    return {'result', 'ok'}
  else
    redis.call('HDEL', KEYS[7], claim)
    for _, jd in ipairs(c.jobs) do
      local k = jkey(jd[1])
      if redis.call('HGET', k, 'batch_claim') == claim then redis.call('HSET', k, 'batch_id', bid) end
    end
  end
  redis.call('HSET', KEYS[8], bid, cjson.encode(entry))
  return {'result', 'ok'}
end

if op == 'return' then
  local claim = ARGV[5]
  local c = redis.call('HGET', KEYS[7], claim)
  if not c then return {'returned', 0} end
  c = cjson.decode(c)
  local n = 0
  for _, jd in ipairs(c.jobs) do
    local id = jd[1]
    local k = jkey(id)
    local j = redis.call('HMGET', k, 'status', 'batch_claim', 'batch_id', 'fq_member', 'fq_tag', 'cost_in',
      'cost_out', 'deadline_at', 'created_at', 'batch_due', 'tenant', 'user_id')
    if j[1] == 'running' and j[2] == claim and not j[3] and j[4] then
      local member = j[4]
      redis.call('HSET', k, 'status', 'queued')
      redis.call('HDEL', k, 'via', 'batch_claim')
      counts_move(j[11], j[12], 'running', 'queued')
      redis.call('HINCRBY', KEYS[5], j[11] .. '\0' .. j[12], 1)
      redis.call('HSET', KEYS[6], id, live_state('queued', j[11], j[12]))
      redis.call('ZADD', KEYS[1], tonumber(j[9]) or now, member)
      redis.call('ZADD', KEYS[2], tonumber(j[10]) or now, member)
      redis.call('HSET', KEYS[3], member, (j[5] or '0') .. ';' .. intstr(j[6]) .. ',' .. intstr(j[7]))
      if j[8] then redis.call('ZADD', KEYS[4], j[8], member) end
      n = n + 1
    end
    redis.call('ZREM', KEYS[9], id)
  end
  redis.call('HDEL', KEYS[7], claim)
  return {'returned', n}
end

if op == 'due' then
  local check, poll_max = tonumber(ARGV[5]), tonumber(ARGV[6])
  -- hand_out lists each entry of hash key that bump finds due (bump pushes
  -- its next look back), saved.
  local function hand_out(key, bump)
    local out = {}
    local all = redis.call('HGETALL', key)
    for k = 1, #all, 2 do
      local e = cjson.decode(all[k + 1])
      if bump(e) then
        local s = cjson.encode(e)
        redis.call('HSET', key, all[k], s)
        out[#out + 1] = {'id', all[k], 'entry', s}
      end
    end
    return out
  end
  local batches = hand_out(KEYS[8], function(e)
    if e.next > now then return false end
    e.wait = math.min(e.wait * 2, poll_max)
    e.next = now + e.wait
    return true
  end)
  local claims = hand_out(KEYS[7], function(c)
    if c.check + check > now then return false end
    c.check = now
    return true
  end)
  return {'batches', batches, 'claims', claims}
end

if op == 'cancel' then
  local e = redis.call('HGET', KEYS[8], ARGV[5])
  if not e then return {'marked', 0} end
  e = cjson.decode(e)
  if e.cancel == 1 then return {'marked', 0} end
  e.cancel = 1
  redis.call('HSET', KEYS[8], ARGV[5], cjson.encode(e))
  return {'marked', 1}
end

if op == 'done' then
  redis.call('HDEL', KEYS[8], ARGV[5])
  return {'done', 1}
end

if op == 'running' then
  local e = redis.call('HGET', KEYS[8], ARGV[5])
  if not e then return {'running', 0} end
  local n = 0
  for _, jd in ipairs(cjson.decode(e).jobs) do
    if redis.call('HGET', jkey(jd[1]), 'status') == 'running' then n = n + 1 end
  end
  return {'running', n}
end

return redis.error_reply('batch.lua: unknown op ' .. tostring(op))
