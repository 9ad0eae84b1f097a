-- The quickstart: 127.0.0.1:7000 goes through a Lua stage that logs each
-- chunk's size to a built-in echo service on 127.0.0.1:7001.
--
--   printf 'hello\n' | socat - TCP:127.0.0.1:7000      # prints hello
return {
  listeners = {
    { name = "front", listen = "127.0.0.1:7000", upstream = "demo",
      pipeline = { "examples.stages.log_chunks" } },
    { name = "echo", listen = "127.0.0.1:7001",
      pipeline = { "sluice.stages.echo" } },
  },
  upstreams = {
    demo = { servers = { "127.0.0.1:7001" } },
  },
}
