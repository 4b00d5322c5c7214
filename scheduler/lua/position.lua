-- position.lua: a queued job's place in its group's fair order (1 = next)
-- and its eta. O(log n). A background job's place is among the background
-- jobs (prelude.lua: service classes).
-- KEYS[1] order   KEYS[2] totals   KEYS[3] limiter state
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] queue member
-- ARGV[3..6] rpm, input_tpm, output_tpm, burst ms   ARGV[7] max concurrency
-- Reply: name, value pairs (scheduler's positionOut): {"position", n, "eta",
-- seconds}, position 0 when the job is not in the queue.
local r = redis.call('ZRANK', KEYS[1], ARGV[2])
if not r then return {'position', 0, 'eta', 0} end
local now = clock(ARGV[1])
local st = lim_load(KEYS[3], now, {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])})
local avg_in, avg_out = queue_avgs(KEYS[2])
-- A background job's place counts the background jobs ahead of it; its
-- eta, every job ahead (the interactive ones all go first).
local pos = r + 1
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2])) >= BG then
  pos = pos - redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. tagstr(BG))
end
return {'position', pos, 'eta', eta_seconds(st, r + 1, avg_in, avg_out, tonumber(ARGV[7]))}
