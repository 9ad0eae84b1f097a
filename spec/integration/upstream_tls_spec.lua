-- Upstreams with tls: sluice speaks TLS to real TLS servers (socat
-- OPENSSL-LISTEN, openssl s_server, and a TLS listener of sluice itself)
-- while its clients speak plain TCP. Certificates come from a CA the spec
-- makes with the openssl command. Every wait is bounded.
local H = require("helpers")

local certs
-- The spec's CA and certificates, made once: backend.test (for DNS
-- backend.test and IP 127.0.0.1), other.test, a self-signed one, and a
-- client certificate, all but the self-signed one from the CA.
local function pki()
  if certs then return certs end
  local d = H.tmpdir() .. "/pki"
  H.sh("mkdir -p " .. H.shq(d))
  local c = { dir = d }
  c.ca, c.ca_key = H.make_ca(d, "spec-ca")
  c.backend, c.backend_key = H.make_signed_cert(d, "backend.test", c.ca, c.ca_key,
                                                "DNS:backend.test,IP:127.0.0.1")
  c.other, c.other_key = H.make_signed_cert(d, "other.test", c.ca, c.ca_key)
  c.client, c.client_key = H.make_signed_cert(d, "client.test", c.ca, c.ca_key)
  c.selfsigned, c.selfsigned_key = H.make_cert(d, "self.test")
  certs = c
  return c
end

-- A TLS echo server (socat, a process per connection) on a fresh port with
-- certificate cert; opts: socat's extra OPENSSL-LISTEN options
-- (",verify=1,cafile=..."); cmd: a shell command to run per connection
-- instead of cat.
local function tls_echo(cert, key, opts, cmd)
  local port = H.free_port()
  local p = H.spawn(("socat OPENSSL-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork,cert=%s,key=%s%s %s")
    :format(port, H.shq(cert), H.shq(key), opts or ",verify=0",
            cmd and ("SYSTEM:" .. H.shq(cmd)) or "EXEC:cat"), "tls-echo")
  assert(H.wait_for(function() return H.port_open(port) end, 10), "TLS echo did not start")
  p.port = port
  return p
end

-- openssl s_server on a fresh port with certificate cert and the extra
-- options args ("-www", "-rev"); returns the process, its port in .port.
local function s_server(cert, key, args)
  local port = H.free_port()
  local p = H.spawn(("openssl s_server -accept 127.0.0.1:%d -cert %s -key %s %s -quiet")
    :format(port, H.shq(cert), H.shq(key), args), "s_server")
  assert(H.wait_for(function() return H.port_open(port) end, 10), "s_server did not start")
  p.port = port
  return p
end

-- sluice with listener "front" to upstream "back" (servers: ports or
-- strings, up: the rest of its table, as Lua text; front: more keys of the
-- listener, as Lua text) and an admin port.
local function start(servers, up, extra, front)
  local list = {}
  for i, s in ipairs(servers) do
    list[i] = type(s) == "number" and ('"127.0.0.1:%d"'):format(s) or s
  end
  local o = { port = H.free_port(), admin = H.free_port() }
  o.p = H.start_sluice(([[
return {
  workers = 1,
  drain_timeout_ms = 100,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back", %s } },
  upstreams = { back = { servers = { %s }, %s } },
  %s
}
]]):format(o.admin, o.port, front or "", table.concat(list, ", "), up, extra or ""))
  o.base = H.pool_held(o.admin)
  return o
end

local function server_metric(o, name, server_port, extra)
  return H.metric(o.admin, name, ('upstream="back",server="127.0.0.1:%d"%s')
    :format(server_port, extra or ""))
end

describe("upstreams with tls", function()
  local peers = H.killed_after_each()
  local function keep(p)
    peers[#peers + 1] = p
    return p
  end

  it("carry bytes both ways to a server whose certificate they verify (its address in it)",
     function()
    local c = pki()
    local s = keep(tls_echo(c.backend, c.backend_key))
    local o = start({ s.port }, ("tls = { ca = %q }"):format(c.ca))
    -- 1 MiB of random bytes: many TLS records each way.
    local input = H.tmpfile("in.bin")
    H.sh(("head -c 1048576 /dev/urandom > %s"):format(H.shq(input)))
    local out = H.exchange(o.port, { file = input }, 30)
    assert.are.equal(1048576, #out)
    assert.is_true(out == H.read(input), "the echo differs from what was sent")
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connections_total", s.port))
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    assert.not_matches("connect failed", log, 1, true)
  end)

  it("send server_name in the ClientHello (SNI) and verify the certificate for it", function()
    local c = pki()
    -- s_server shows other.test's certificate unless the client asks for
    -- backend.test by SNI; -rev answers each line reversed.
    local port = keep(s_server(c.other, c.other_key, ("-cert2 %s -key2 %s -servername "
      .. "backend.test -rev"):format(H.shq(c.backend), H.shq(c.backend_key)))).port
    local o = start({ port }, ("tls = { ca = %q, server_name = \"backend.test\" }"):format(c.ca))
    local out = H.exchange(o.port, "hello sni\n", 10)
    assert.are.equal("ins olleh\n", out)
    local log = H.stop_sluice(o.p)
    assert.not_matches("connect failed", log, 1, true)
  end)

  it("refuse a server whose certificate they cannot verify and try the next server", function()
    local c = pki()
    local untrusted = keep(tls_echo(c.selfsigned, c.selfsigned_key))
    local wrong_name = keep(tls_echo(c.other, c.other_key))   -- for other.test, not 127.0.0.1
    local good = keep(tls_echo(c.backend, c.backend_key))
    local o = start({ untrusted.port, wrong_name.port, good.port },
                    ("tls = { ca = %q }, fail_timeout_ms = 60000"):format(c.ca))
    for i = 1, 4 do
      assert.are.equal("ping " .. i, H.exchange(o.port, "ping " .. i, 10))
    end
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total",
                                      untrusted.port, ',reason="tls"'))
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total",
                                      wrong_name.port, ',reason="tls"'))
    assert.are.equal(4, server_metric(o, "sluice_upstream_server_connections_total", good.port))
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    -- A server given as an address must have it in its certificate.
    assert.matches(("upstream 127.0.0.1:%d for front closed: connect failed: tls_error "
                    .. "(certificate verify failed: self-signed certificate)")
                   :format(untrusted.port), log, 1, true)
    assert.matches(("upstream 127.0.0.1:%d for front closed: connect failed: tls_error "
                    .. "(certificate verify failed: IP address mismatch)")
                   :format(wrong_name.port), log, 1, true)
  end)

  it("close the client as upstream_unavailable when no server passes, and count why", function()
    local c = pki()
    local s = keep(tls_echo(c.selfsigned, c.selfsigned_key))
    local o = start({ s.port }, ("tls = { ca = %q }"):format(c.ca))
    assert.are.equal("", H.exchange(o.port, "lost", 10))
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total", s.port,
                                      ',reason="tls"'))
    assert.are.equal(0, server_metric(o, "sluice_upstream_server_connections_total", s.port))
    local _, _, body = H.admin_get(o.admin, "/upstreams")
    assert.matches('"tls": 1', body, 1, true)
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    assert.matches("closed: upstream_unavailable", log, 1, true)
  end)

  it("take any certificate with verify = false", function()
    local c = pki()
    local s = keep(tls_echo(c.selfsigned, c.selfsigned_key))
    local o = start({ s.port }, "tls = { verify = false }")
    assert.are.equal("unverified", H.exchange(o.port, "unverified", 10))
    H.stop_sluice(o.p)
  end)

  it("show their client certificate to a server that asks for one (mutual TLS)", function()
    local c = pki()
    local s = keep(tls_echo(c.backend, c.backend_key, (",verify=1,cafile=%s"):format(H.shq(c.ca))))
    local o = start({ s.port }, ("tls = { ca = %q, certificate = %q, key = %q }")
      :format(c.ca, c.client, c.client_key))
    assert.are.equal("mutual", H.exchange(o.port, "mutual", 10))
    H.stop_sluice(o.p)
    -- Without it, the server refuses the session. (In TLS 1.3 the server
    -- checks the client's certificate after the client's handshake is
    -- done: the refusal comes as an alert on the connection.)
    o = start({ s.port }, ("tls = { ca = %q }"):format(c.ca))
    assert.are.equal("", H.exchange(o.port, "anonymous", 10))
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    -- The alert, also when sluice's write reached the server after it had
    -- closed (the reset comes after the alert).
    assert.matches(("upstream 127.0.0.1:%d for front closed: tls_error (tlsv13 alert certificate "
                    .. "required)"):format(s.port), log, 1, true)
  end)

  it("resume the server's session on the next connection, unless session_reuse = false", function()
    local c = pki()
    -- s_server -www answers GET / with a page that says whether the
    -- session was New or Reused.
    local port = keep(s_server(c.backend, c.backend_key, "-www")).port
    local function pages(o, n)
      local seen = {}
      for i = 1, n do
        local page = H.exchange(o.port, "GET / HTTP/1.0\r\n\r\n", 10)
        seen[i] = page:match("\n(%a+), TLSv1%.[23]") or ("no status in: " .. page)
      end
      return seen
    end
    local o = start({ port }, ("tls = { ca = %q }"):format(c.ca))
    assert.are.same({ "New", "Reused", "Reused" }, pages(o, 3))
    assert.are.equal(3, server_metric(o, "sluice_upstream_server_connections_total", port))
    assert.are.equal(2, server_metric(o, "sluice_upstream_server_tls_resumed_total", port))
    H.stop_sluice(o.p)
    o = start({ port }, ("tls = { ca = %q, session_reuse = false }"):format(c.ca))
    assert.are.same({ "New", "New" }, pages(o, 2))
    assert.are.equal(0, server_metric(o, "sluice_upstream_server_tls_resumed_total", port))
    H.stop_sluice(o.p)
  end)

  it("send the PROXY protocol header in the clear before the handshake", function()
    -- The server is a TLS listener of the same sluice that reads a PROXY
    -- header first (tls.proxy_protocol), then echoes through "echo".
    local c = pki()
    local echo = keep(H.start_echo())
    local inner = H.free_port()
    local access = H.tmpfile("access.log", "")
    local o = start({ inner }, ('tls = { ca = %q }, send_proxy = "v2"'):format(c.ca), ([[
  access_log = %q,
  access_log_format = "json",
]]):format(access))
    -- The inner listener joins by a reload (its port is known only now).
    local text = H.read(o.p.config):gsub('listeners = {', ([[listeners = {
    { name = "inner", listen = "127.0.0.1:%d", upstream = "echo",
      tls = { certificate = %q, key = %q, proxy_protocol = true } },]])
      :format(inner, c.backend, c.backend_key), 1)
      :gsub('upstreams = {', ('upstreams = { echo = { servers = { "127.0.0.1:%d" } },')
      :format(echo.port), 1)
    local f = assert(io.open(o.p.config, "wb"))
    f:write(text)
    f:close()
    os.execute(("kill -HUP %d"):format(o.p.pid))
    assert(H.wait_for(function()
      return H.read(o.p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 20), "no reload:\n" .. H.read(o.p.log))
    -- (listening once the reload is logged; a probe would be a connection
    -- of its own in the access log)
    assert.are.equal("through two", H.exchange(o.port, "through two", 10))
    local lines = H.log_lines(access, 2)
    assert.are.equal(2, #lines, H.read(access))
    local by = {}
    for _, l in ipairs(lines) do by[l:match('"listener":"(%w+)"')] = l end
    -- The inner listener saw the front client's own address.
    local client = by.front:match('"client":"([^"]+)"')
    assert.are.equal(client, by.inner:match('"client":"([^"]+)"'), H.read(access))
    assert.matches('"tls":"TLSv1.3"', by.inner, 1, true)
    -- Sent to the server: the v2 header (28 bytes for IPv4) and the
    -- client's 11, as on a plain upstream.
    assert.are.equal(28 + 11, server_metric(o, "sluice_upstream_server_sent_bytes_total", inner))
    H.stop_sluice(o.p)
  end)

  it("give the handshake connect_timeout_ms, and drop a try whose client went away", function()
    -- A server that accepts and never answers the ClientHello.
    local raw = H.raw_listener()
    local o = start({ raw.port }, "tls = { verify = false }, connect_timeout_ms = 300")
    local t0 = H.now()
    assert.are.equal("", H.exchange(o.port, "waits", 10))
    assert.is_true(H.now() - t0 < 9, "the handshake was not timed out")
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total", raw.port,
                                      ',reason="timeout"'))
    -- A client that leaves while the handshake waits: the try ends with it.
    local cl = H.connect(o.port)
    cl.send("gone")
    assert(raw.accept(10), "sluice did not connect")
    cl.close()
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    raw.close()
    assert.matches("TLS handshake timed out", log, 1, true)
  end)

  it("check their servers over TLS: a certificate that fails marks its server down", function()
    local c = pki()
    local good = keep(tls_echo(c.backend, c.backend_key))
    local untrusted = keep(tls_echo(c.selfsigned, c.selfsigned_key))
    local o = start({ good.port, untrusted.port }, ("tls = { ca = %q }, max_fails = 0, "
      .. "health_check = { interval_ms = 2000, timeout_ms = 2000, fails = 1, passes = 1 }")
      :format(c.ca))
    local down = ("server 127.0.0.1:%d is down (health check: 1 failed in a row, last: tls_error "
                  .. "(certificate verify failed: self-signed certificate))"):format(untrusted.port)
    assert(H.wait_for(function() return H.read(o.p.log):find(down, 1, true) end, 20),
           "no health check line:\n" .. H.read(o.p.log))
    assert.are.equal(0, server_metric(o, "sluice_upstream_server_up", untrusted.port))
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_up", good.port))
    for i = 1, 4 do assert.are.equal("via " .. i, H.exchange(o.port, "via " .. i, 10)) end
    assert.are.equal(4, server_metric(o, "sluice_upstream_server_connections_total", good.port))
    local log = H.stop_sluice(o.p)
    assert.not_matches(("server 127.0.0.1:%d is down"):format(good.port), log, 1, true)
  end)

  it("send and expect a health check's bytes through TLS", function()
    local c = pki()
    -- s_server -www answers "GET /" with "HTTP/1.0 200 ok" and a page; a
    -- TLS echo sends the request back, which has no "200 ok".
    local www = keep(s_server(c.backend, c.backend_key, "-www")).port
    local echo = keep(tls_echo(c.backend, c.backend_key))
    local o = start({ www, echo.port }, ("tls = { ca = %q }, health_check = { interval_ms = 2000, "
      .. "timeout_ms = 2000, fails = 1, passes = 1, send = \"GET / HTTP/1.0\\r\\n\\r\\n\", "
      .. "expect = \"200 ok\" }"):format(c.ca))
    local down = ("server 127.0.0.1:%d is down (health check: 1 failed in a row"):format(echo.port)
    assert(H.wait_for(function() return H.read(o.p.log):find(down, 1, true) end, 20),
           "no health check line:\n" .. H.read(o.p.log))
    -- Another round: the server that answers stays up. (Timeouts of 2 s:
    -- a verified handshake takes long under valgrind.)
    H.sleep(2.5)
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_up", www))
    local log = H.stop_sluice(o.p)
    assert.not_matches(("server 127.0.0.1:%d is down"):format(www), log, 1, true)
  end)

  it("pass on a client's FIN that came before the handshake once it is done, not inside it",
     function()
    local c = pki()
    -- A server that speaks first, then echoes until the client's end.
    local s = keep(tls_echo(c.backend, c.backend_key, nil, "echo banner; cat; echo done"))
    -- The stage connects at the client's FIN: the connect starts with the
    -- FIN passed on already, and with nothing queued before it.
    local o = start({ s.port }, ("tls = { ca = %q }"):format(c.ca), nil,
                    'pipeline = { { "spec.fixtures.upstream.at_end", target = "back" } }')
    assert.are.equal("banner\ndone\n", H.exchange(o.port, "", 10))
    assert.are.equal("banner\nhello\ndone\n", H.exchange(o.port, "hello\n", 10))
    for _, reason in ipairs({ "refused", "timeout", "other", "tls" }) do
      assert.are.equal(0, server_metric(o, "sluice_upstream_server_connect_failures_total", s.port,
                                        (',reason="%s"'):format(reason)), reason)
    end
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    assert.not_matches("connect failed", log, 1, true)
    -- Without a stage: a client that sends nothing and half-closes at once
    -- (its FIN often there when its connection is accepted).
    o = start({ s.port }, ("tls = { ca = %q }"):format(c.ca))
    for _ = 1, 3 do assert.are.equal("banner\ndone\n", H.exchange(o.port, "", 10)) end
    log = H.stop_sluice(o.p)
    assert.not_matches("connect failed", log, 1, true)
  end)

  it("carry a client's FIN to the next server when a handshake fails", function()
    local c = pki()
    local untrusted = keep(tls_echo(c.selfsigned, c.selfsigned_key))
    local good = keep(tls_echo(c.backend, c.backend_key, nil, "echo banner; cat; echo done"))
    local o = start({ untrusted.port, good.port },
                    ("tls = { ca = %q }, tries = 2, fail_timeout_ms = 60000"):format(c.ca), nil,
                    'pipeline = { { "spec.fixtures.upstream.at_end", target = "back" } }')
    -- The first try (the untrusted server) had the FIN; the second gets it.
    assert.are.equal("banner\ndone\n", H.exchange(o.port, "", 5))
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total",
                                      untrusted.port, ',reason="tls"'))
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    H.stop_sluice(o.p)
  end)

  it("end a try at once when its client closes during the handshake", function()
    -- A server that accepts and never answers the ClientHello; the client
    -- is closed by its idle timeout while the handshake waits, with bytes
    -- queued for the server (read at the accept: defer_accept).
    local raw = H.raw_listener()
    local o = start({ raw.port }, "tls = { verify = false }, connect_timeout_ms = 1000", nil,
                    "defer_accept = true, idle_timeout_ms = 200")
    local cl = H.connect(o.port)
    cl.send("gone")
    assert(raw.accept(10), "sluice did not connect")
    assert(H.wait_for(function()
      return H.read(o.p.log):find(("upstream 127.0.0.1:%d for front closed: peer closed")
                                  :format(raw.port), 1, true)
    end, 10), "the try outlived its client:\n" .. H.read(o.p.log))
    assert.are.equal("", cl.recv(1, 10))
    cl.close()
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    raw.close()
    assert.matches("closed: idle_timeout", log, 1, true)
    assert.not_matches("TLS handshake timed out", log, 1, true)
  end)

  it("log the alert of a server that refuses the session (verify = false), not a reset", function()
    local c = pki()
    -- The server asks for a client certificate and gets none: in TLS 1.3
    -- its alert comes once sluice's side of the handshake is done, often
    -- with a reset that the write of the client's bytes finds first.
    local s = keep(tls_echo(c.backend, c.backend_key, (",verify=1,cafile=%s"):format(H.shq(c.ca))))
    local o = start({ s.port }, "tls = { verify = false }")
    for i = 1, 10 do assert.are.equal("", H.exchange(o.port, "refused " .. i, 10)) end
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    local _, alerts = log:gsub(("upstream 127%%.0%%.0%%.1:%d for front closed: tls_error %%(tlsv13 "
                                .. "alert certificate required%%) %%(in"):format(s.port), "")
    assert.are.equal(10, alerts, log)
  end)

  it("refuse a server whose certificate the crl revokes and try the next server", function()
    local c = pki()
    local revoked = H.make_signed_cert(c.dir, "revoked.test", c.ca, c.ca_key, "IP:127.0.0.1")
    local bad = keep(tls_echo(revoked, c.dir .. "/revoked.test.key"))
    local good = keep(tls_echo(c.backend, c.backend_key))
    local crl = H.make_crl(c.dir, c.ca, c.ca_key, { revoked })
    local o = start({ bad.port, good.port },
                    ("tls = { ca = %q, crl = %q }, fail_timeout_ms = 60000"):format(c.ca, crl))
    for i = 1, 3 do
      assert.are.equal("crl " .. i, H.exchange(o.port, "crl " .. i, 10))
    end
    assert.are.equal(1, server_metric(o, "sluice_upstream_server_connect_failures_total",
                                      bad.port, ',reason="tls"'))
    assert.are.equal(3, server_metric(o, "sluice_upstream_server_connections_total", good.port))
    assert.is_true(H.pool_back(o.admin, o.base), "pool not back to where it started")
    local log = H.stop_sluice(o.p)
    assert.matches(("upstream 127.0.0.1:%d for front closed: connect failed: tls_error "
                    .. "(certificate verify failed: certificate revoked)"):format(bad.port), log, 1,
                   true)
  end)

  it("refuse a configuration whose tls files cannot be used, naming the key (exit 2)", function()
    local c = pki()
    local function check(tls)
      local cfg = H.tmpfile("bad.lua", ([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:1", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:2" }, tls = %s } },
}
]]):format(tls))
      return H.sh(("%s %s --check %s 2>&1"):format(H.wrapper, H.shq(H.bin), H.shq(cfg)))
    end
    local out, rc = check(('{ ca = "%s/none.pem" }'):format(c.dir))
    assert.are.equal(2, rc, out)
    assert.matches(("config error: upstreams.back.tls.ca: cannot read %s/none.pem (No such file "
                    .. "or directory)"):format(c.dir), out, 1, true)
    out, rc = check(("{ ca = %q, certificate = %q, key = %q }"):format(c.ca, c.client, c.other_key))
    assert.are.equal(2, rc, out)
    assert.matches(("config error: upstreams.back.tls.key: %s does not match the certificate %s")
                   :format(c.other_key, c.client), out, 1, true)
    out, rc = check('{ ciphers = "RC4" }')
    assert.are.equal(2, rc, out)
    assert.matches('config error: upstreams.back.tls.ciphers: no usable cipher in "RC4"', out, 1,
                   true)
    out, rc = check(("{ ca = %q, crl = %q }"):format(c.ca, c.ca))
    assert.are.equal(2, rc, out)
    assert.matches(("config error: upstreams.back.tls.crl: %s holds no CRL"):format(c.ca), out, 1,
                   true)
    out, rc = check(('{ ca = %q, crl = "%s/none.crl" }'):format(c.ca, c.dir))
    assert.are.equal(2, rc, out)
    assert.matches(("config error: upstreams.back.tls.crl: cannot read %s/none.crl"):format(c.dir),
                   out, 1, true)
    out, rc = check(('{ verify = false, crl = "%s/none.crl" }'):format(c.dir))
    assert.are.equal(2, rc, out)
    assert.matches("upstreams.back.tls.crl: expected no crl with verify = false", out, 1, true)
  end)
end)
