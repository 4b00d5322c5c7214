-- budget.lua: a dollar budget of one scope (a user, in the user's slot;
-- a tenant, in the tenant's), per UTC day and per UTC month, in µ$. A job
-- reserves its worst-case cost at admission (take), before the group's
-- admission script, and settles it to what its calls cost when it ends
-- (give): the counters then hold what was spent plus what running and
-- queued jobs hold. Periods are fixed (a day's counter starts at 0 at
-- midnight UTC); a job settles in the periods it reserved in.
--
-- KEYS[1] the day's counter   KEYS[2] the month's counter (strings, µ$)
-- KEYS[3] the job's settlement mark (a give counts once per job)
-- ARGV[1] "take" | "give"   ARGV[2] day limit   ARGV[3] month limit (µ$, 0 = none)
-- take: ARGV[4] µ$ to reserve
--   Reply: name, value pairs (scheduler's budgetTakeOut): {"outcome", "ok"}
--   or {"outcome", "budget", "period", "day"|"month", "limit", µ$, "used", µ$}
-- give: ARGV[4] µ$ reserved   ARGV[5] µ$ the job's calls cost
--   Reply 1, or 0 when it was settled already.
local dl, ml = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[1] == 'give' then
  if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', 40 * 86400) then return 0 end
  local delta = tonumber(ARGV[5]) - tonumber(ARGV[4])
  if delta ~= 0 then
    for _, k in ipairs({KEYS[1], KEYS[2]}) do
      -- A counter that expired with its period is not brought back.
      if redis.call('EXISTS', k) == 1 then redis.call('INCRBY', k, intstr(delta)) end
    end
  end
  return 1
end

local amt = tonumber(ARGV[4])
local ud = tonumber(redis.call('GET', KEYS[1])) or 0
local um = tonumber(redis.call('GET', KEYS[2])) or 0
if dl > 0 and ud + amt > dl then return {'outcome', 'budget', 'period', 'day', 'limit', dl, 'used', ud} end
if ml > 0 and um + amt > ml then return {'outcome', 'budget', 'period', 'month', 'limit', ml, 'used', um} end
redis.call('INCRBY', KEYS[1], intstr(amt))
redis.call('EXPIRE', KEYS[1], 3 * 86400)
redis.call('INCRBY', KEYS[2], intstr(amt))
redis.call('EXPIRE', KEYS[2], 40 * 86400)
return {'outcome', 'ok'}
