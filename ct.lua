return { workers = 1, admin = { listen = "127.0.0.1:27199" }, listeners = {
  { name = "ct", listen = "127.0.0.1:27110", upstream = "u", connect_timeout_ms = 300 },
  { name = "bk", listen = "127.0.0.1:27182", pipeline = { "sluice.stages.echo" } },
}, upstreams = { u = { servers = { "127.0.0.1:27187", "127.0.0.1:27182" }, balance = "round_robin", connect_timeout_ms = 5000 } } }
