-- settle.lua: close a job's reservations, each exactly once, when its
-- record cannot take part (it is gone): the limiter's (one per dispatch)
-- and, with final, the hold on the user's quota, when the record still
-- has one (the caller gives it back in the user's slot: lua/quota.lua). A
-- job's own steps settle through lifecycle.lua. A second call finds no
-- reservation and changes nothing.
-- KEYS[1] limiter state   KEYS[2] reservations   KEYS[3] leases
-- KEYS[4] job hash
-- KEYS[5] the group's use per minute (tokens as settled: "i<minute>", "o<minute>")
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] job id
-- ARGV[3..5] what the upstream counted: requests, input tokens, output tokens
-- ARGV[6..9] rpm, input_tpm, output_tpm, burst ms
-- ARGV[10] call duration ms (0 = the call did not complete: not measured)
-- ARGV[11] wake channel
-- ARGV[12] "1" when the job has ended: take the quota hold too
-- Reply: name, value pairs (scheduler's settleOut): {"limiter", settled
-- 0|1, "quota", hold taken 0|1, "hold", the hold taken (quota_held's pairs;
-- none: empty)}
local now = clock(ARGV[1])
local used = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local cfg = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])}
local limiter, taken, hold = 0, 0, {}
if settle_limiter(KEYS[1], KEYS[2], KEYS[3], KEYS[5], now, cfg, ARGV[2], used, tonumber(ARGV[10])) then
  limiter = 1
end
if ARGV[12] == '1' then
  local held = quota_held(KEYS[4])
  if held then taken, hold = 1, held end
end
redis.call('PUBLISH', ARGV[11], 'settled')
return {'limiter', limiter, 'quota', taken, 'hold', hold}
