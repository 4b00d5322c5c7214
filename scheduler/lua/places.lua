-- places.lua: the place in line and eta of each of a batch of jobs of one
-- group, for the api processes that push positions to their followers.
-- Read only: the limiter state and the queue's averages are read once for
-- the batch, then it is one ZRANK per job.
-- KEYS[1] order   KEYS[2] totals   KEYS[3] limiter state
-- ARGV[1] now ms (0 = Redis TIME)
-- ARGV[2..5] rpm, input_tpm, output_tpm, burst ms   ARGV[6] max concurrency
-- ARGV[7..]: queue members
-- A background job's position counts only the background jobs ahead of it.
-- Reply: position, eta seconds, position, eta seconds, ... (position 0: the
-- job no longer waits in the queue). Unlike the other scripts' replies, not
-- name, value pairs: integers only, read without boxing each one
-- (scheduler's placesReply).
local now = clock(ARGV[1])
local st = lim_load(KEYS[3], now, {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])})
local avg_in, avg_out = queue_avgs(KEYS[2])
local max_conc = tonumber(ARGV[6])
local out = {}
local n_i -- the interactive jobs waiting, read once
for k = 7, #ARGV do
  local r = redis.call('ZRANK', KEYS[1], ARGV[k])
  if r then
    -- Every interactive job sorts before every background one: a rank
    -- past the interactive jobs is a background job's, placed among its
    -- class (its eta still counts them all).
    if not n_i then n_i = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. tagstr(BG)) end
    local pos = r + 1
    if r >= n_i then pos = r + 1 - n_i end
    out[#out + 1] = pos
    out[#out + 1] = eta_seconds(st, r + 1, avg_in, avg_out, max_conc)
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
  end
end
return out
