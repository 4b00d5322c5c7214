-- append.lua: log one event of a running job (started, delta, retrying) and
-- publish it, but only while the job is in the expected status: a delta that
-- arrives after a cancel must not follow the terminal event.
-- KEYS[1] job hash   KEYS[2] job event stream
-- ARGV[1] required status   ARGV[2] event name   ARGV[3] event data (JSON)
-- ARGV[4] event channel     ARGV[5] stream max length
-- ARGV[6] dispatch number the job must be at ("0" = any)
-- Reply: the event id; error "STATE <current>" or "NOTFOUND".
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  return redis.error_reply('NOTFOUND')
end
if cur ~= ARGV[1] then
  return redis.error_reply('STATE ' .. cur)
end
if ARGV[6] ~= '0' and redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[6] then
  return redis.error_reply('STATE superseded')
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[2], 'data', ARGV[3])
redis.call('PUBLISH', ARGV[4], '{"id":"' .. id .. '","event":"' .. ARGV[2] .. '","data":' .. ARGV[3] .. '}')
return id
