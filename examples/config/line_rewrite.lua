-- examples.line_rewrite in front of a line server: 127.0.0.1:7020 forwards to
-- 127.0.0.1:7021, turning "PING ..." lines into "PONG ..." and hiding
-- passwords on "PASS" lines.
--
--   socat TCP-LISTEN:7021,bind=127.0.0.1,fork EXEC:cat &       # a line echo server
--   build/sluice -c examples/config/line_rewrite.lua &
--   printf 'PING 1\r\nPASS hunter2\nhello\n' | socat -t 2 - TCP:127.0.0.1:7020
--   # PONG 1 / PASS ***** / hello
--
-- SLUICE_EXAMPLE_LISTEN and SLUICE_EXAMPLE_UPSTREAM change the addresses.
return {
  listeners = {
    { name = "line_rewrite", listen = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7020",
      upstream = "lines",
      pipeline = {
        { "examples.line_rewrite", max_length = 8192,
          rules = { { match = "^PING", replace = "PONG" },
                    { match = "^(PASS ).*", replace = "%1*****" } } },
      } },
  },
  upstreams = {
    lines = { servers = { os.getenv("SLUICE_EXAMPLE_UPSTREAM") or "127.0.0.1:7021" } },
  },
}
