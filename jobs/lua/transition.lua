-- transition.lua: move a job from one status to another, update its fields and
-- log the event that says so, atomically. Refuses when the job is not in one
-- of the allowed statuses, so two racing writers (a worker finishing, a user
-- canceling) cannot both win.
-- KEYS[1] job hash   KEYS[2] job event stream
-- KEYS[3] (optional) the owner's counts of queued and running jobs
-- ARGV[1] allowed current statuses, space separated
-- ARGV[2] new status
-- ARGV[3] event name ("" = log no event)   ARGV[4] event data (JSON); the
--         text "__ATTEMPTS__" (quoted) in it becomes the attempt count
-- ARGV[5] event channel   ARGV[6] ttl seconds ("0" = keep)
-- ARGV[7] "1" to count an attempt          ARGV[8] stream max length
-- ARGV[9] dispatch number the job must be at ("0" = any): a worker whose
--         dispatch was superseded (its lease expired) cannot write
-- ARGV[10] prefix of a group's waiting-users hash ("" = none): the hash
--         <prefix><group>:users counts each user's queued jobs in the group
-- ARGV[11] tallies, JSON [{k, f, z, n, t}] ("" = none): statistics bumped in
--         the same step, so they agree exactly with the jobs: HINCRBY k f n,
--         or ZINCRBY k n f when z is true; t = key ttl seconds (0 = keep)
-- ARGV[12..] field, value pairs; a field named "?name" is set only if absent
-- Reply: {event id or "", attempts}; errors "NOTFOUND" or "STATE <current>".
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  return redis.error_reply('NOTFOUND')
end
local ok = false
for s in string.gmatch(ARGV[1], '%S+') do
  if s == cur then ok = true end
end
if not ok then
  return redis.error_reply('STATE ' .. cur)
end
if ARGV[9] ~= '0' and redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[9] then
  return redis.error_reply('STATE superseded')
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if KEYS[3] and cur ~= ARGV[2] then
  if cur == 'queued' or cur == 'running' then redis.call('HINCRBY', KEYS[3], cur, -1) end
  if ARGV[2] == 'queued' or ARGV[2] == 'running' then redis.call('HINCRBY', KEYS[3], ARGV[2], 1) end
end
if ARGV[10] ~= '' and cur ~= ARGV[2] and (cur == 'queued' or ARGV[2] == 'queued') then
  local j = redis.call('HMGET', KEYS[1], 'group', 'tenant', 'user_id')
  if j[1] and j[2] and j[3] then
    local users, u = ARGV[10] .. j[1] .. ':users', j[2] .. '\0' .. j[3]
    if ARGV[2] == 'queued' then
      redis.call('HINCRBY', users, u, 1)
    elseif redis.call('HINCRBY', users, u, -1) <= 0 then
      redis.call('HDEL', users, u)
    end
  end
end
if ARGV[11] ~= '' then
  for _, t in ipairs(cjson.decode(ARGV[11])) do
    if t.z then
      redis.call('ZINCRBY', t.k, t.n, t.f)
    else
      redis.call('HINCRBY', t.k, t.f, t.n)
    end
    if t.t > 0 then redis.call('EXPIRE', t.k, t.t) end
  end
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[7] == '1' then
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
for i = 12, #ARGV, 2 do
  local f = ARGV[i]
  if string.sub(f, 1, 1) == '?' then
    redis.call('HSETNX', KEYS[1], string.sub(f, 2), ARGV[i + 1])
  else
    redis.call('HSET', KEYS[1], f, ARGV[i + 1])
  end
end
if ARGV[6] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
local id = ''
if ARGV[3] ~= '' then
  local data = string.gsub(ARGV[4], '"__ATTEMPTS__"', tostring(attempts))
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'event', ARGV[3], 'data', data)
  if ARGV[6] ~= '0' then
    redis.call('EXPIRE', KEYS[2], ARGV[6])
  end
  redis.call('PUBLISH', ARGV[5], '{"id":"' .. id .. '","event":"' .. ARGV[3] .. '","data":' .. data .. '}')
end
return {id, attempts}
