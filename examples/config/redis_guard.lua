-- examples.redis_guard in front of a redis-server: 127.0.0.1:7010 forwards to
-- 127.0.0.1:6379 and refuses FLUSHALL and KEYS.
--
--   redis-server --port 6379 --save '' &
--   build/sluice -c examples/config/redis_guard.lua &
--   redis-cli -p 7010 SET k v        # OK
--   redis-cli -p 7010 FLUSHALL       # (error) ERR command 'FLUSHALL' is not allowed
--
-- SLUICE_EXAMPLE_LISTEN and SLUICE_EXAMPLE_UPSTREAM change the addresses.
return {
  listeners = {
    { name = "redis_guard", listen = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7010",
      upstream = "redis",
      pipeline = { { "examples.redis_guard", deny = { "FLUSHALL", "KEYS" } } } },
  },
  upstreams = {
    redis = { servers = { os.getenv("SLUICE_EXAMPLE_UPSTREAM") or "127.0.0.1:6379" } },
  },
}
