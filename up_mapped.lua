return { workers = 1, listeners = { { name = "f", listen = "127.0.0.1:27391", upstream = "u" } }, upstreams = { u = { servers = { "[::ffff:127.0.0.1]:27390" } } } }
