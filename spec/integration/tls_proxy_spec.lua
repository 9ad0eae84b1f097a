-- A TLS listener behind a load balancer that sends a PROXY protocol header
-- and then passes the client's TLS bytes through (tls.proxy_protocol):
-- HAProxy in tcp mode with send-proxy / send-proxy-v2 in front of sluice,
-- and a socat relay that writes a header of the spec's choosing before
-- what the client sends. The clients speak TLS (socat OPENSSL) to sluice
-- through them; sluice speaks plain TCP to an echo peer.
local H = require("helpers")


local cert, key
local function certs()
  if not cert then
    local d = H.tmpdir() .. "/certs"
    H.sh("mkdir -p " .. H.shq(d))
    cert, key = H.make_cert(d, "alpha.test")
  end
  return cert, key
end

-- Starts sluice with a TLS listener that reads a PROXY header first, in
-- front of upstream_port. Returns p and { port, admin, access }.
local function start(upstream_port)
  local c, k = certs()
  local o = { port = H.free_port(), admin = H.free_port(), access = H.tmpfile("access.log", "") }
  local p = H.start_sluice(([[
return {
  workers = 1,
  drain_timeout_ms = 100,
  access_log = %q,
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "secure", listen = "127.0.0.1:%d", upstream = "back",
      tls = { certificate = %q, key = %q, proxy_protocol = true } },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(o.access, o.admin, o.port, c, k, upstream_port))
  return p, o
end




-- Waits until the access log has n lines; returns them.
local function settle(access, n)
  local lines = H.log_lines(access, n)
  assert(#lines == n, "expected " .. n .. " access log lines:\n" .. H.read(access))
  return lines
end

-- A relay on a fresh port: each connection gets `header` (printf format)
-- written to sluice first, then what the client sends. Starting it makes
-- one connection to sluice (the check that it listens): the spec waits
-- for its access log line (access, the lines before it: n).
local function relay(header, sluice_port, access, n)
  local script = H.tmpfile("relay.sh", ("{ printf %s; cat; } | socat -t 10 - TCP:127.0.0.1:%d\n")
    :format(H.shq(header), sluice_port))
  local r = H.start_peer("sh " .. script, nil, "-t 10")
  settle(access, n + 1)
  return r
end

-- HAProxy in tcp mode in front of sluice, sending a header of `send`
-- ("send-proxy" or "send-proxy-v2"). (The check that it listens may make
-- a connection to sluice too, or not.)
local function haproxy(send, sluice_port)
  local port = H.free_port()
  local cfg = H.tmpfile("haproxy.cfg", ([[
global
  maxconn 64
defaults
  mode tcp
  timeout connect 10s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:%d
  default_backend b
backend b
  server s 127.0.0.1:%d %s
]]):format(port, sluice_port, send))
  local p = H.spawn("haproxy -db -f " .. H.shq(cfg), "haproxy")
  assert(H.wait_for(function() return H.port_open(port) end, 10),
         "haproxy did not start:\n" .. H.read(p.log))
  p.port = port
  return p
end


describe("tls proxy_protocol", function()
  local peers = H.killed_after_each()

  it("reads a v1 header before the handshake: the client it names is the connection's", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start(echo.port)
    local r = relay("PROXY TCP4 203.0.113.7 127.0.0.1 5555 443\\r\\n", o.port, o.access, 0)
    peers[#peers + 1] = r
    local base = H.pool_held(o.admin)
    local fails = H.metric(o.admin, "sluice_tls_handshake_failures_total", 'listener="secure"')
    local out, rc = H.tls_exchange(r.port, H.tmpfile("in", "hello through a balancer\n"))
    assert.are.equal(0, rc)
    assert.are.equal("hello through a balancer\n", out)
    local line = settle(o.access, 2)[2]
    assert.matches(" client=203.0.113.7:5555 listener=secure ", line, 1, true)
    assert.matches(" bytes_in=25 bytes_out=25 ", line, 1, true)   -- the header is not counted
    assert.matches(" tls=TLSv1.3 reason=", line, 1, true)
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(fails, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                     'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("takes the client's address from HAProxy's send-proxy and send-proxy-v2", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start(echo.port)
    local base = H.pool_held(o.admin)
    for _, send in ipairs({ "send-proxy", "send-proxy-v2" }) do
      local hp = haproxy(send, o.port)
      peers[#peers + 1] = hp
      -- The client comes from 127.0.0.2; HAProxy connects to sluice from 127.0.0.1.
      local sport = H.free_port()
      local out, rc = H.tls_exchange(hp.port, H.tmpfile("in", send .. " says hi\n"),
                                     { bind = "127.0.0.2:" .. sport })
      assert.are.equal(0, rc)
      assert.are.equal(send .. " says hi\n", out)
      local want = (" client=127.0.0.2:%d listener=secure "):format(sport)
      local line = H.wait_for(function()
        for l in H.read(o.access):gmatch("[^\n]+") do
          if l:find(want, 1, true) then return l end
        end
      end, 30)
      assert(line, "no line with" .. want .. ":\n" .. H.read(o.access))
      assert.matches(" tls=TLSv1.3 reason=", line, 1, true)
      H.stop(hp, "KILL")
    end
    assert.is_truthy(H.pool_back(o.admin, base))
    local log = H.stop_sluice(p)
    assert.not_matches("bad PROXY protocol header", log, 1, true)
  end)

  it("keeps the socket's address for a v2 LOCAL header (a balancer's health check)", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start(echo.port)
    -- Signature, version 2 LOCAL, UNSPEC, no address block.
    local r = relay("\\r\\n\\r\\n\\000\\r\\nQUIT\\n\\040\\000\\000\\000", o.port, o.access, 0)
    peers[#peers + 1] = r
    local base = H.pool_held(o.admin)
    local out, rc = H.tls_exchange(r.port, H.tmpfile("in", "ping\n"))
    assert.are.equal(0, rc)
    assert.are.equal("ping\n", out)
    local line = settle(o.access, 2)[2]
    assert.matches(" client=127%.0%.0%.1:%d+ listener=secure ", line)
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("closes a connection whose header is bad, with the reason; another carries on", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start(echo.port)
    local r = relay("PROXY TCP4 198.51.100.4 127.0.0.1 4444 443\\r\\n", o.port, o.access, 0)
    peers[#peers + 1] = r
    local base = H.pool_held(o.admin)
    local fails = H.metric(o.admin, "sluice_tls_handshake_failures_total", 'listener="secure"')
    -- A TLS client through the relay that sends, waits, then sends again.
    local go, hout = H.tmpfile("go"), H.tmpfile("held.out", "")
    local script = ("printf 'first\\n'; while [ ! -e %s ]; do sleep 0.02; done; printf 'second\\n'")
      :format(H.shq(go))
    local client = H.spawn(("sh -c %s"):format(H.shq(
      ("(%s) | socat -t 10 - OPENSSL:127.0.0.1:%d,verify=0 >%s"):format(script, r.port, H.shq(hout)))),
      "held")
    assert.is_truthy(H.wait_for(function() return H.read(hout) == "first\n" end, 20))
    -- Plain bytes, a TLS client with no header, a header cut short, a v2 one
    -- with a bad signature: each is closed before any TLS.
    local bad = {
      { plain = "GET / HTTP/1.0\r\n\r\n", why = "not a PROXY protocol header" },
      { tls = true, why = "not a PROXY protocol header" },
      { plain = "PROXY TCP4 192.0.2.1", why = "the client closed before the header was complete" },
      { plain = "\r\n\r\n\0\r\nQUIX\n\x21\x11\0\12", why = "bad v2 signature" },
    }
    for _, b in ipairs(bad) do
      if b.tls then
        local out, rc = H.tls_exchange(o.port, H.tmpfile("in", "never seen\n"))
        assert.are_not.equal(0, rc)
        assert.are.equal("", out)
      else
        assert.are.equal("", (H.exchange(o.port, b.plain, 10)))
      end
    end
    H.sh("touch " .. H.shq(go))
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(client.rc_file)) end, 20))
    assert.are.equal("first\nsecond\n", H.read(hout))
    local lines = settle(o.access, #bad + 2)
    table.remove(lines, 1)   -- the relay's start
    local last = lines[#lines]
    assert.matches(" client=198.51.100.4:4444 listener=secure ", last, 1, true)
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(fails + #bad, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                            'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    local log = H.stop_sluice(p)
    for i, b in ipairs(bad) do
      assert.matches("closed: bad PROXY protocol header (" .. b.why .. ")", log, 1, true)
      assert.matches(' tls=- reason="bad PROXY protocol header (' .. b.why .. ')"', lines[i], 1,
                     true)
    end
  end)

  describe("configuration", function()
    -- --check, then a start (-c) when start is true: both refuse it.
    local function check(extra, pipeline, start)
      local c, k = certs()
      local cfg = H.tmpfile("bad.lua", ([[
return { listeners = { { name = "s", listen = "127.0.0.1:%d",
  pipeline = { %s"sluice.stages.echo" },
  tls = { certificate = %q, key = %q, %s } } } }
]]):format(H.free_port(), pipeline or "", c, k, extra))
      local out, rc = H.sh(("%s %s --check %s 2>&1"):format(H.wrapper, H.shq(H.bin), H.shq(cfg)))
      if not start then return out, rc end
      local out2, rc2 = H.sh(("timeout 60 %s %s -c %s 2>&1"):format(H.wrapper, H.shq(H.bin),
                                                                    H.shq(cfg)))
      return out, rc, out2, rc2
    end

    it("refuses a proxy_protocol that is not a boolean (exit 2)", function()
      local out, rc, out2, rc2 = check('proxy_protocol = "v2"', nil, true)
      assert.are.equal(2, rc)
      assert.matches('config error: listeners[1].tls.proxy_protocol: expected a boolean, got "v2"',
                     out, 1, true)
      assert.are.equal(2, rc2)
      assert.not_matches("started with", out2, 1, true)
    end)

    it("refuses it with the stage sluice.proxy_protocol in the same listener (exit 2)", function()
      local out, rc = check("proxy_protocol = true", '"sluice.proxy_protocol", ')
      assert.are.equal(2, rc)
      assert.matches('config error: listeners[1].tls.proxy_protocol: expected no stage '
                     .. '"sluice.proxy_protocol"', out, 1, true)
      out, rc = check("proxy_protocol = false", '"sluice.proxy_protocol", ')
      assert.are.equal(0, rc, out)
    end)
  end)
end)
