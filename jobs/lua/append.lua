-- append.lua: log events of a running job (started, delta, block_start,
-- block_delta, block_stop, upstream_event, retrying) and publish each, in
-- order, in one step, but only while the job is in the expected status: a
-- delta that arrives after a cancel must not follow the terminal event.
-- KEYS[1] job hash   KEYS[2] job event stream
-- ARGV[1] required status   ARGV[2] event channel   ARGV[3] stream max length
-- ARGV[4] dispatch number the job must be at ("0" = any)
-- ARGV[5], ARGV[6], ... event name, event data (JSON), for each event
-- Reply: the last event's id; error "STATE <current>" or "NOTFOUND".
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then
  return redis.error_reply('NOTFOUND')
end
if cur ~= ARGV[1] then
  return redis.error_reply('STATE ' .. cur)
end
if ARGV[4] ~= '0' and redis.call('HGET', KEYS[1], 'dispatch') ~= ARGV[4] then
  return redis.error_reply('STATE superseded')
end
local id
for i = 5, #ARGV, 2 do
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[i], 'data', ARGV[i + 1])
  redis.call('PUBLISH', ARGV[2], '{"id":"' .. id .. '","event":"' .. ARGV[i] .. '","data":' .. ARGV[i + 1] .. '}')
end
return id
