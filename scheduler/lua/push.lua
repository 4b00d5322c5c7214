-- push.lua: log a `queued` event for a waiting job whose position changed
-- since the last one it logged (at most one a second), so every follower,
-- in any api process, sees its place in line move. Any number of api
-- processes may call this for the same job: the check and the write are one
-- step, so a change is logged once.
-- KEYS[1] order   KEYS[2] totals   KEYS[3] limiter state
-- KEYS[4] job hash   KEYS[5] job events
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] queue member
-- ARGV[3..6] rpm, input_tpm, output_tpm, burst ms   ARGV[7] max concurrency
-- ARGV[8] events channel   ARGV[9] stream max length   ARGV[10] ttl seconds
-- ARGV[11] least ms between two pushes
-- Reply: the job's position (0 when it no longer waits in the queue).
local r = redis.call('ZRANK', KEYS[1], ARGV[2])
if not r then return 0 end
local position = r + 1
local now = clock(ARGV[1])
local j = redis.call('HMGET', KEYS[4], 'status', 'pos', 'pos_at', 'ev0')
if j[1] ~= 'queued' then return 0 end
local last = tonumber(j[2])
if not last and j[4] then last = tonumber(string.match(j[4], '"position":(%d+)')) end
if last == position or now - num(j[3], 0) < tonumber(ARGV[11]) then return position end
local st = lim_load(KEYS[3], now, {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])})
local avg_in, avg_out = queue_avgs(KEYS[2])
local eta = eta_seconds(st, position, avg_in, avg_out, tonumber(ARGV[7]))
local data = '{"position":' .. position .. ',"eta_seconds":' .. eta .. '}'
local id = redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', 'event', 'queued', 'data', data)
redis.call('EXPIRE', KEYS[5], ARGV[10])
redis.call('HSET', KEYS[4], 'pos', position, 'pos_at', now)
redis.call('PUBLISH', ARGV[8], '{"id":"' .. id .. '","event":"queued","data":' .. data .. '}')
return position
