-- admit.lua: accept a job: store its record, put it in its user's lane of
-- the group's fair queue, log its `queued` event (with position and eta) and
-- wake the dispatchers — one atomic step.
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
-- KEYS[1] job hash   KEYS[2] job events   KEYS[3] sequence   KEYS[4] order
-- KEYS[5] finish tags (zset user -> F)    KEYS[6] V          KEYS[7] costs
-- KEYS[8] queue totals   KEYS[9] limiter state
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id   ARGV[3] ttl seconds
-- ARGV[4] events channel   ARGV[5] stream max length   ARGV[6] user key
-- ARGV[7] input estimate   ARGV[8] max_tokens   ARGV[9] weight
-- ARGV[10] wake channel    ARGV[11..14] rpm, input_tpm, output_tpm, burst ms
-- ARGV[15] max concurrency ARGV[16..] job hash field, value pairs
-- Reply: {event id, position, eta seconds}; error "EXISTS".
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('EXISTS')
end
local now = clock(ARGV[1])
local id, cin, cout, weight = ARGV[2], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local seq = redis.call('INCR', KEYS[3])
local member = string.format('%016d', seq) .. '|' .. id
local v = num(redis.call('GET', KEYS[6]), 0)
local f = num(redis.call('ZSCORE', KEYS[5], ARGV[6]), 0)
local tag = math.max(v, f)
redis.call('ZADD', KEYS[4], tag, member)
redis.call('ZADD', KEYS[5], tag + (cin + cout) / weight, ARGV[6])
redis.call('HSET', KEYS[7], member, cin .. ',' .. cout)
redis.call('HINCRBY', KEYS[8], 'n', 1)
redis.call('HINCRBY', KEYS[8], 'in', cin)
redis.call('HINCRBY', KEYS[8], 'out', cout)

local fields = {}
for i = 16, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'fq_member', member, 'fq_tag', tostring(tag),
  'cost_in', cin, 'cost_out', cout, 'dispatch', 0, unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])

local position = redis.call('ZRANK', KEYS[4], member) + 1
local st = lim_load(KEYS[9], now, {tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])})
local avg_in, avg_out = queue_avgs(KEYS[8])
local eta = eta_seconds(st, position, avg_in, avg_out, tonumber(ARGV[15]))
local data = '{"position":' .. position .. ',"eta_seconds":' .. eta .. '}'
local ev = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', 'queued', 'data', data)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], '{"id":"' .. ev .. '","event":"queued","data":' .. data .. '}')
redis.call('PUBLISH', ARGV[10], 'arrival')
return {ev, position, eta}
