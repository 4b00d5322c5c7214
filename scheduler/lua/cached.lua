-- cached.lua: how many of a job's input tokens the upstream holds cached
-- now (its longest cached prefix), for the charge to its user's token
-- quota before admission (admit.lua counts the same for the fair queue).
-- KEYS[1] the group's cache hash
-- ARGV[1] now ms (0 = Redis TIME)   ARGV[2] the cacheable prefixes ("hash:tokens:ttl_ms;…")
return cache_cached(KEYS[1], cache_prefixes(ARGV[2]), clock(ARGV[1]))
