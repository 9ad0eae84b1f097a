-- The PROXY protocol both ways, in one process: "edge" stands for a load
-- balancer in front (HAProxy's send-proxy-v2, an AWS NLB): it forwards each
-- client to "inner" with a PROXY header first. "inner" reads the header with
-- sluice.proxy_protocol, so its log, its access log and examples.redis_guard
-- see the real client, not the balancer; then it forwards to redis-server.
--
--   redis-server --port 6379 --save '' &
--   build/sluice -c examples/config/behind_balancer.lua &
--   redis-cli -p 7050 SET k v        # OK, through edge and inner
--   redis-cli -p 7050 FLUSHALL       # (error) ERR command 'FLUSHALL' is not allowed
--
-- Both log the same client address: "client 127.0.0.1:41234 on edge closed"
-- and "client 127.0.0.1:41234 on inner closed". On its own, inner would log
-- edge's address (127.0.0.1 and an ephemeral port of edge's).
--
-- SLUICE_EXAMPLE_LISTEN, SLUICE_EXAMPLE_INNER and SLUICE_EXAMPLE_UPSTREAM
-- change the addresses.
local edge = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7050"
local inner = os.getenv("SLUICE_EXAMPLE_INNER") or "127.0.0.1:7051"

return {
  listeners = {
    { name = "edge", listen = edge, upstream = "inner" },
    { name = "inner", listen = inner, upstream = "redis",
      pipeline = { "sluice.proxy_protocol",
                   { "examples.redis_guard", deny = { "FLUSHALL", "KEYS" } } } },
  },
  upstreams = {
    inner = { servers = { inner }, send_proxy = "v2" },
    redis = { servers = { os.getenv("SLUICE_EXAMPLE_UPSTREAM") or "127.0.0.1:6379" } },
  },
}
