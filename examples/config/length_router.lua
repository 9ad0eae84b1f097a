-- examples.length_router in front of a backend: 127.0.0.1:7030 answers ECHO
-- frames (header 0x01) itself and forwards FORWARD frames (header 0x02) to
-- 127.0.0.1:7031.
--
--   socat TCP-LISTEN:7031,bind=127.0.0.1,fork EXEC:cat &       # an echo backend
--   build/sluice -c examples/config/length_router.lua &
--   printf '\0\0\0\3\1hi\0\0\0\3\2yo' | socat -t 2 - TCP:127.0.0.1:7030 | od -c
--
-- SLUICE_EXAMPLE_LISTEN and SLUICE_EXAMPLE_UPSTREAM change the addresses.
return {
  listeners = {
    { name = "length_router", listen = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7030",
      upstream = "backend",
      pipeline = { { "examples.length_router", max_frame_length = 65536 } } },
  },
  upstreams = {
    backend = { servers = { os.getenv("SLUICE_EXAMPLE_UPSTREAM") or "127.0.0.1:7031" } },
  },
}
