-- Two redis-servers behind one address: 127.0.0.1:7040 balances new
-- connections over 127.0.0.1:6379 and 127.0.0.1:6380 (twice the share),
-- retries a connect that fails on the other server, skips a server that
-- stops answering PING (health checks) and takes it back once it answers.
--
--   redis-server --port 6379 --save '' &
--   redis-server --port 6380 --save '' &
--   build/sluice -c examples/config/redis_pool.lua &
--   redis-cli -p 7040 INFO server | grep tcp_port   # 6379 or 6380
--
-- A pool of independent servers suits caches and read replicas: each
-- connection stays on the server it was given, so keys are not shared
-- between servers. SLUICE_EXAMPLE_LISTEN and SLUICE_EXAMPLE_SERVERS
-- ("host:port,host:port") change the addresses; a server may be a host
-- name ("redis-a.internal:6379"), resolved when the configuration loads.
-- No client address may hold more than 256 of the pool's connections.
local servers = {}
for s in (os.getenv("SLUICE_EXAMPLE_SERVERS") or "127.0.0.1:6379,127.0.0.1:6380"):gmatch("[^,]+") do
  servers[#servers + 1] = s
end
if servers[2] then servers[2] = { servers[2], weight = 2 } end

return {
  listeners = {
    { name = "redis_pool", listen = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7040",
      upstream = "redis", max_connections_per_client = 256 },
  },
  upstreams = {
    redis = {
      servers = servers,
      balance = "round_robin",
      connect_timeout_ms = 1000,
      max_fails = 1, fail_timeout_ms = 10000,
      -- a server is up when it answers PING, not merely when it accepts
      health_check = { interval_ms = 1000, timeout_ms = 500, fails = 2, passes = 2,
                       send = "PING\r\n", expect = "+PONG" },
    },
  },
}
