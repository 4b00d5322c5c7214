-- create.lua: store a new job, put it in its group's queue and log its first
-- event (`queued`), in one atomic step.
-- KEYS[1] job hash        KEYS[2] job event stream   KEYS[3] group queue (zset)
-- KEYS[4] sequence counter
-- ARGV[1] job id  ARGV[2] ttl seconds  ARGV[3] event channel
-- ARGV[4] seconds per request (for eta)  ARGV[5] stream max length
-- ARGV[6..] field, value pairs of the job hash
-- Reply: {event id, position}; error "EXISTS" if the job id is taken.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('EXISTS')
end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[2])
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
local position = redis.call('ZRANK', KEYS[3], ARGV[1]) + 1
local eta = math.floor((position - 1) * tonumber(ARGV[4]) + 0.5)
local data = '{"position":' .. position .. ',"eta_seconds":' .. eta .. '}'
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', 'queued', 'data', data)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], '{"id":"' .. id .. '","event":"queued","data":' .. data .. '}')
return {id, position}
