-- A Lua stage in front of the built-in echo service: 127.0.0.1:7002 answers
-- every line in upper case. No upstream: the pipeline is the service.
--
--   printf 'hello\n' | socat -t 2 - TCP:127.0.0.1:7002      # prints HELLO
return {
  listeners = {
    { name = "upper", listen = "127.0.0.1:7002",
      pipeline = { "examples.stages.upper", "sluice.stages.echo" } },
  },
}
