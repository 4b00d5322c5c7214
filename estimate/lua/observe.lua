-- observe.lua: fold one observed actual/estimated ratio into a model's EWMA.
-- KEYS[1] ratios hash   ARGV[1] model   ARGV[2] observed ratio   ARGV[3] alpha
-- Reply: the new ratio (a string).
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local obs, a = tonumber(ARGV[2]), tonumber(ARGV[3])
local new = obs
if old then new = (1 - a) * old + a * obs end
redis.call('HSET', KEYS[1], ARGV[1], new)
return tostring(new)
