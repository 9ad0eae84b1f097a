-- TLS on a listener's client side, through the real binary: socat and
-- openssl s_client speak TLS to sluice, which speaks plain TCP to real
-- peers. Certificates are made with the openssl command in the spec's own
-- folder when it runs.
local H = require("helpers")
local ffi = require("ffi")

local MiB = 1024 * 1024


local dir
local function certs_dir()
  if not dir then
    dir = H.tmpdir() .. "/certs"
    H.sh("mkdir -p " .. H.shq(dir))
    H.make_cert(dir, "alpha.test")
    H.make_cert(dir, "beta.test")
  end
  return dir
end

local function config(o)
  return ([[
return {
  workers = 1,
  drain_timeout_ms = 100,
  access_log = %q,
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "secure", listen = "127.0.0.1:%d", %s %s
      tls = { certificate = %q, key = %q, %s } },
  },
  %s
}
]]):format(o.access, o.admin, o.port,
           o.upstream_port and 'upstream = "back",' or "", o.listener or "",
           o.cert, o.key, o.tls or "",
           o.upstream_port and ('upstreams = { back = { servers = { "127.0.0.1:%d" } } },')
             :format(o.upstream_port) or "")
end

-- Starts sluice with a TLS listener; returns p and the settings (port, admin, access).
local function start(o)
  local d = certs_dir()
  o.port, o.admin = H.free_port(), H.free_port()
  o.access = H.tmpfile("access.log", "")
  o.cert = o.cert or d .. "/alpha.test.crt"
  o.key = o.key or d .. "/alpha.test.key"
  local p = H.start_sluice(config(o))
  return p, o
end




local function sha256(path)
  return (H.sh("sha256sum " .. H.shq(path))):match("^(%x+)")
end


-- A clean end: the client's close ("eof"), or its upstream's first ("peer
-- closed"), as the two FINs happened to cross.
local function clean_end(line)
  return line:match('reason="eof"$') or line:match('reason="peer closed"$')
end

-- The subject of the certificate sluice shows on port (openssl s_client).
local function subject(port)
  local out = H.sh(("timeout 20 openssl s_client -connect 127.0.0.1:%d </dev/null 2>/dev/null")
    :format(port))
  return out:match("subject=([^\n]*)")
end

describe("tls", function()
  local peers = H.killed_after_each()

  it("carries a small exchange to a plain upstream and back", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port })
    local base = H.pool_held(o.admin)
    local out, rc = H.tls_exchange(o.port, H.tmpfile("in", "hello over tls\n"))
    assert.are.equal(0, rc)
    assert.are.equal("hello over tls\n", out)
    local line = H.log_lines(o.access, 1)[1]
    assert.is_truthy(clean_end(line), line)
    assert.matches("bytes_in=15 bytes_out=15 ", line, 1, true)   -- plaintext bytes
    assert.matches(" tls=TLSv1.3 reason=", line, 1, true)
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(0, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("moves several MiB both ways to a client that reads late, checksums equal", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port })
    local base = H.pool_held(o.admin)
    local input = H.tmpfile("big")
    H.sh(("head -c %d /dev/urandom >%s"):format(12 * MiB, H.shq(input)))
    -- The client's reader waits a second: its socket and sluice's outbound
    -- queue fill (SSL_write_ex has to wait for EV_WRITE), then it drains.
    local out = H.tmpfile("big.out")
    local _, rc = H.sh(("timeout 120 sh -c %s"):format(H.shq(
      ("socat -t 30 -T 60 -b 65536 - OPENSSL:127.0.0.1:%d,verify=0 <%s 2>/dev/null | "
       .. "(sleep 1; cat >%s)"):format(o.port, H.shq(input), H.shq(out)))))
    assert.are.equal(0, rc)
    assert.are.equal(sha256(input), sha256(out))
    local line = H.log_lines(o.access, 1)[1]
    assert.matches(("bytes_in=%d bytes_out=%d "):format(12 * MiB, 12 * MiB), line, 1, true)
    assert.is_truthy(clean_end(line), line)
    local log = H.read(p.log)
    -- The outbound queue to the client did fill: its peak is in the close line.
    local peak = tonumber(log:match("client [%d.:]+ on secure closed: [%a ]+ %(in %d+ B, "
                                    .. "out %d+ B, peak queue (%d+) B"))
    assert.is_truthy(peak and peak > 65536, log)
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("writes many small buffers to a slow client as whole records, every byte in order",
     function()
    -- Each line is a buffer of its own on the way back (a line codec, then
    -- echo): short entries are copied together into records, and a write
    -- OpenSSL must repeat (the socket full) is repeated with the same bytes.
    local p, o = start({ listener = 'write_spin_count = 1, pipeline = { { "sluice.codec.line", '
                                   .. 'max_length = 1024, strip_delimiter = false }, '
                                   .. '"sluice.stages.echo" },' })
    local base = H.pool_held(o.admin)
    local input = H.tmpfile("lines")
    H.sh(("seq 1 300000 >%s"):format(H.shq(input)))
    local outs = {}
    for i = 1, 3 do   -- at once, each reader late
      outs[i] = H.tmpfile("lines.out")
      H.spawn(("sh -c %s"):format(H.shq(
        ("socat -t 30 -T 60 -b 65536 - OPENSSL:127.0.0.1:%d,verify=0 <%s 2>/dev/null | "
         .. "(sleep 1; cat >%s)"):format(o.port, H.shq(input), H.shq(outs[i])))), "lines")
    end
    local lines = H.log_lines(o.access, 3)
    assert.are.equal(3, #lines, H.read(p.log))
    local want = sha256(input)
    for i = 1, 3 do
      assert.is_truthy(clean_end(lines[i]), lines[i])
      assert.is_truthy(H.wait_for(function() return sha256(outs[i]) == want end, 30))
    end
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("keeps to min_version and selects an ALPN protocol", function()
    local p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                         tls = 'min_version = "TLSv1.3", alpn = { "h2", "http/1.1" },' })
    local base = H.pool_held(o.admin)
    local s_client = "timeout 20 openssl s_client -connect 127.0.0.1:%d %s </dev/null 2>&1"
    local out = H.sh(s_client:format(o.port, "-alpn http/1.1,h2"))
    assert.matches("ALPN protocol: h2", out, 1, true)
    assert.matches("TLSv1.3", out, 1, true)
    out = H.sh(s_client:format(o.port, "-alpn spdy/1"))
    assert.matches("No ALPN negotiated", out, 1, true)
    H.sh(s_client:format(o.port, "-tls1_2"))
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("on secure closed: tls_error %(unsupported protocol%)")
    end, 20), H.read(p.log))
    assert.are.equal(2, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("closes a client that sends plain bytes with the reason, while a TLS client carries on",
     function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port })
    local base = H.pool_held(o.admin)
    -- A TLS client held open mid-conversation.
    local go, out = H.tmpfile("go"), H.tmpfile("held.out", "")
    local script = ("printf 'first\\n'; while [ ! -e %s ]; do sleep 0.02; done; printf 'second\\n'")
      :format(H.shq(go))
    local c = H.spawn(("sh -c %s"):format(H.shq(
      ("(%s) | socat -t 10 - OPENSSL:127.0.0.1:%d,verify=0 >%s"):format(script, o.port, H.shq(out)))),
      "held")
    assert.is_truthy(H.wait_for(function() return H.read(out) == "first\n" end, 30), H.read(p.log))
    -- Plain text, then random bytes, to the TLS port: each closed, nothing echoed.
    local reply = H.exchange(o.port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 20)
    assert.are.equal("", reply)
    local junk = H.tmpfile("junk")
    H.sh(("head -c 4096 /dev/urandom >%s"):format(H.shq(junk)))
    assert.are.equal("", (H.exchange(o.port, { file = junk }, 20)))
    local log = H.read(p.log)
    assert.matches("client 127%.0%.0%.1:%d+ on secure closed: tls_error %(http request%)", log)
    local lines = H.log_lines(o.access, 2)
    assert.matches('reason="tls_error %(http request%)"$', lines[1])
    assert.matches('reason="tls_error %(', lines[2])
    assert.matches("upstream=- ", lines[1], 1, true)   -- no upstream connection was made
    assert.matches(" tls=- reason=", lines[1], 1, true)  -- no handshake done
    -- The held client goes on.
    H.sh("touch " .. H.shq(go))
    assert.is_truthy(H.wait_for(function() return tonumber(H.read(c.rc_file)) end, 30))
    assert.are.equal("first\nsecond\n", H.read(out))
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(2, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("closes a client that never finishes its handshake (tls_handshake_timeout)", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port, tls = "handshake_timeout_ms = 300," })
    local base = H.pool_held(o.admin)
    -- Connects and sends nothing: sluice closes it (the read sees the end).
    local c = H.connect(o.port)
    assert.are.equal("", c.recv(1, 30))
    c.close()
    local line = H.log_lines(o.access, 1)[1]
    assert.matches('reason="tls_handshake_timeout"$', line)
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("counts a handshake that something else ended (the idle timeout) as failed", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port, listener = "idle_timeout_ms = 300,",
                         tls = "handshake_timeout_ms = 60000," })
    local base = H.pool_held(o.admin)
    -- Connects and sends nothing: the idle timeout closes it first.
    local c = H.connect(o.port)
    assert.are.equal("", c.recv(1, 30))
    c.close()
    local line = H.log_lines(o.access, 1)[1]
    assert.matches(' tls=%- reason="idle_timeout"$', line)
    assert.are.equal(0, H.metric(o.admin, "sluice_tls_handshakes_total", 'listener="secure"'))
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("passes a client's half-close on and brings the upstream's answer back over TLS",
     function()
    -- The upstream answers only once its input has ended.
    local up = H.start_peer("sha256sum | cut -c1-64")
    peers[#peers + 1] = up
    local p, o = start({ upstream_port = up.port })
    local base = H.pool_held(o.admin)
    local input = H.tmpfile("half")
    H.sh(("head -c %d /dev/urandom >%s"):format(3 * MiB, H.shq(input)))
    local out, rc = H.tls_exchange(o.port, input)
    assert.are.equal(0, rc)
    assert.are.equal(sha256(input) .. "\n", out)
    local line = H.log_lines(o.access, 1)[1]
    assert.is_truthy(clean_end(line), line)
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("passes the upstream's half-close on, and the client's bytes after it still go up",
     function()
    -- The upstream says "hi", ends its output (pipes: its stdout apart from
    -- its stdin), then counts what it reads until its input ends.
    local count = H.tmpfile("count")
    local port = H.free_port()
    peers[#peers + 1] = H.spawn(("socat TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr SYSTEM:%s,pipes")
      :format(port, H.shq(("printf hi; exec 1>&-; wc -c >%s"):format(H.shq(count)))), "peer")
    assert.is_truthy(H.wait_for(function()   -- (ss: a probe connection would be its only one)
      return (H.sh("ss -ltn")):find("127.0.0.1:" .. port, 1, true)
    end, 10))
    local p, o = start({ upstream_port = port })
    local base = H.pool_held(o.admin)
    -- The client sends only after sluice has passed the upstream's end on.
    local out = H.tmpfile("half.out")
    local _, rc = H.sh(("timeout 60 sh -c %s"):format(H.shq(
      ("(sleep 1; head -c 5000 /dev/zero) | socat -t 10 - OPENSSL:127.0.0.1:%d,verify=0 >%s "
       .. "2>/dev/null"):format(o.port, H.shq(out)))))
    assert.are.equal(0, rc)
    assert.are.equal("hi", H.read(out))
    assert.is_truthy(H.wait_for(function() return H.read(count):match("^%s*5000%s*$") end, 20),
                     H.read(p.log))
    assert.is_truthy(clean_end(H.log_lines(o.access, 1)[1]))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("ends with close_notify after the upstream's FIN, not after its reset (a cut answer)",
     function()
    local up = H.raw_listener()
    local p, o = start({ upstream_port = up.port })
    local base = H.pool_held(o.admin)
    -- s_client says "closed" for a close_notify, an error for a TCP end
    -- without one.
    local function client()
      local c = H.spawn(("timeout 30 openssl s_client -connect 127.0.0.1:%d -ign_eof </dev/null")
                        :format(o.port), "s_client")
      local fd = up.accept(30)
      assert.is_truthy(fd, H.read(p.log))
      local answer = "the first part of an answer\n"
      assert.are.equal(#answer, tonumber(ffi.C.write(fd, answer, #answer)))
      -- The client has the part before the upstream ends: a reset read in
      -- the same burst as the part would drop it with the client's queue
      -- (an error close drops what is queued).
      assert.is_truthy(H.wait_for(function()
        return H.read(c.log):find(answer, 1, true)
      end, 30), H.read(p.log))
      return c, c.log, fd
    end
    local function ended(c, out)
      assert.is_truthy(H.wait_for(function() return tonumber(H.read(c.rc_file)) end, 40))
      local text = H.read(out)
      assert.matches("the first part of an answer\n", text, 1, true)
      return text
    end
    -- The upstream ends cleanly: the client gets close_notify.
    local c, out, fd = client()
    ffi.C.close(fd)
    assert.matches("\nclosed\n", ended(c, out), 1, true)
    -- The upstream resets mid-answer: the client must not be told the
    -- stream ended cleanly.
    c, out, fd = client()
    up.reset(fd)
    local text = ended(c, out)
    assert.not_matches("\nclosed\n", text, 1, true)
    assert.matches("unexpected eof", text, 1, true)
    local lines = H.log_lines(o.access, 2)
    assert.matches('reason="peer closed: reset', lines[2], 1, true)
    up.close()
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("gives a pipeline's Lua stage the plaintext", function()
    -- A stage that says what its channel knows of TLS when it becomes active.
    local stage = H.tmpfile("tls_seen.lua", [[
local log = require("sluice.log")
return {
  channel_active = function(ctx)
    log.info("active over %s", tostring(ctx:channel():tls_version()))
    ctx:fire_active()
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local p, o = start({ listener = ('pipeline = { %q, "examples.stages.upper", '
                                     .. '"sluice.stages.echo" },'):format(mod) })
    local base = H.pool_held(o.admin)
    local out, rc = H.tls_exchange(o.port, H.tmpfile("in", "quiet words\nmore\n"))
    assert.are.equal(0, rc)
    assert.are.equal("QUIET WORDS\nMORE\n", out)
    assert.matches("active over TLSv1.3", H.read(p.log), 1, true)
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)

  it("shows the certificate the client names by SNI, and tells a Lua stage the name", function()
    local d = certs_dir()
    local ca, ca_key = H.make_ca(d, "sni-ca")
    H.make_signed_cert(d, "wild", ca, ca_key, "DNS:*.wild.test,DNS:wild.test")
    local stage = H.tmpfile("sni_seen.lua", [[
local log = require("sluice.log")
return {
  channel_active = function(ctx)
    log.info("active for %s", tostring(ctx:channel():tls_server_name()))
    ctx:fire_active()
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local p, o = start({
      listener = ('pipeline = { %q, "sluice.stages.echo" },'):format(mod),
      tls = ('certificates = { { certificate = "%s/beta.test.crt", key = "%s/beta.test.key" }, '
             .. '{ certificate = "%s/wild.crt", key = "%s/wild.key" } },'):format(d, d, d, d),
    })
    local function subject_for(name)
      local out = H.sh(("timeout 20 openssl s_client -connect 127.0.0.1:%d %s </dev/null 2>/dev/null")
        :format(o.port, name and ("-servername " .. name) or "-noservername"))
      return out:match("subject=([^\n]*)")
    end
    assert.are.equal("CN = beta.test", subject_for("beta.test"))
    assert.are.equal("CN = beta.test", subject_for("BETA.test"))
    assert.are.equal("CN = wild", subject_for("api.wild.test"))
    assert.are.equal("CN = wild", subject_for("wild.test"))
    -- One label only, and any other name or none: the listener's certificate.
    assert.are.equal("CN = alpha.test", subject_for("a.b.wild.test"))
    assert.are.equal("CN = alpha.test", subject_for("gamma.test"))
    assert.are.equal("CN = alpha.test", subject_for(nil))
    local log = H.stop_sluice(p)
    assert.matches("active for beta.test", log, 1, true)
    assert.matches("active for api.wild.test", log, 1, true)
    assert.matches("active for nil", log, 1, true)
  end)

  it("asks clients for a certificate from client_ca, refuses the others, and names it to a stage",
     function()
    local d = certs_dir()
    local ca, ca_key = H.make_ca(d, "clients-ca")
    local ccert, ckey = H.make_signed_cert(d, "client.test", ca, ca_key)
    local stage = H.tmpfile("peer_seen.lua", [[
local log = require("sluice.log")
return {
  channel_active = function(ctx)
    log.info("client certificate %s", tostring(ctx:channel():tls_peer_subject()))
    ctx:fire_active()
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    -- socat as a TLS client with the certificate (or none): what came back.
    local function send(o, what, cert, key)
      local out = H.tmpfile("mtls.out")
      H.sh(("printf %s | timeout 20 socat -t 5 - OPENSSL:127.0.0.1:%d,verify=0%s >%s 2>/dev/null")
        :format(H.shq(what), o.port,
                cert and (",cert=%s,key=%s"):format(H.shq(cert), H.shq(key)) or "", H.shq(out)))
      return H.read(out)
    end
    local p, o = start({ listener = ('pipeline = { %q, "sluice.stages.echo" },'):format(mod),
                         tls = ("client_ca = %q,"):format(ca) })
    local base = H.pool_held(o.admin)
    assert.are.equal("with one", send(o, "with one", ccert, ckey))
    assert.are.equal("", send(o, "without", nil))
    assert.are.equal("", send(o, "self-signed", d .. "/beta.test.crt", d .. "/beta.test.key"))
    assert.are.equal(2, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    local log = H.stop_sluice(p)
    assert.matches("client certificate CN=client.test", log, 1, true)
    assert.matches("tls_error (peer did not return a certificate)", log, 1, true)
    assert.matches("tls_error (certificate verify failed: self-signed certificate)", log, 1, true)
    -- optional: a client without one is let in, one with a bad one is not.
    p, o = start({ listener = ('pipeline = { %q, "sluice.stages.echo" },'):format(mod),
                   tls = ('client_ca = %q, client_certificate = "optional",'):format(ca) })
    assert.are.equal("anonymous", send(o, "anonymous", nil))
    assert.are.equal("", send(o, "self-signed", d .. "/beta.test.crt", d .. "/beta.test.key"))
    log = H.stop_sluice(p)
    assert.matches("client certificate nil", log, 1, true)
  end)

  describe("configuration", function()
    local function check(tls_text)
      local d = certs_dir()
      local cfg = H.tmpfile("bad.lua", ([[
return { listeners = { { name = "s", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" },
  tls = { %s } } } }
]]):format(H.free_port(), tls_text:gsub("DIR", d)))
      local out, rc = H.sh(("%s %s --check %s 2>&1"):format(H.wrapper, H.shq(H.bin), H.shq(cfg)))
      local out2, rc2 = H.sh(("%s %s -c %s 2>&1"):format(H.wrapper, H.shq(H.bin), H.shq(cfg)))
      return out, rc, out2, rc2
    end

    it("refuses a certificate file that cannot be read, naming the key (exit 2)", function()
      local out, rc, out2, rc2 = check('certificate = "DIR/none.crt", key = "DIR/alpha.test.key"')
      assert.are.equal(2, rc)
      assert.matches("config error: listeners[1].tls.certificate: cannot read "
                     .. certs_dir() .. "/none.crt (No such file or directory)", out, 1, true)
      assert.are.equal(2, rc2)   -- and nothing starts
      assert.matches("listeners[1].tls.certificate", out2, 1, true)
      assert.not_matches("started with", out2, 1, true)
    end)

    it("refuses a key that does not belong to the certificate (exit 2)", function()
      local out, rc = check('certificate = "DIR/alpha.test.crt", key = "DIR/beta.test.key"')
      assert.are.equal(2, rc)
      assert.matches("config error: listeners[1].tls.key: " .. certs_dir()
                     .. "/beta.test.key does not match the certificate", out, 1, true)
    end)

    it("refuses SNI certificates that cannot be used or name a host twice (exit 2)", function()
      local base = 'certificate = "DIR/alpha.test.crt", key = "DIR/alpha.test.key", '
      local out, rc = check(base .. 'certificates = { { certificate = "DIR/beta.test.crt", '
                            .. 'key = "DIR/alpha.test.key" } }')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.certificates[1].key: " .. certs_dir()
                     .. "/alpha.test.key does not match the certificate", out, 1, true)
      out, rc = check(base .. 'certificates = { { certificate = "DIR/beta.test.crt", '
                      .. 'key = "DIR/beta.test.key" }, { certificate = "DIR/beta.test.crt", '
                      .. 'key = "DIR/beta.test.key" } }')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.certificates[2].certificate: " .. certs_dir()
                     .. "/beta.test.crt names beta.test, as certificates[1] does", out, 1, true)
      out, rc = check(base .. 'client_ca = "DIR/no-ca.pem"')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.client_ca: cannot read " .. certs_dir()
                     .. "/no-ca.pem (No such file or directory)", out, 1, true)
      out, rc = check(base .. 'certificates = { { certificate = "DIR/none.crt", key = "x" } }')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.certificates[1].certificate: cannot read "
                     .. certs_dir() .. "/none.crt", out, 1, true)
    end)

    it("refuses a cipher list OpenSSL has nothing for, and unknown keys (exit 2)", function()
      local out, rc = check('certificate = "DIR/alpha.test.crt", key = "DIR/alpha.test.key", '
                            .. 'ciphers = "NO-SUCH-CIPHER"')
      assert.are.equal(2, rc)
      assert.matches('config error: listeners[1].tls.ciphers: no usable cipher in "NO-SUCH-CIPHER"',
                     out, 1, true)
      out, rc = check('certificate = "DIR/alpha.test.crt", key = "DIR/alpha.test.key", '
                      .. 'min_version = "TLSv1.1"')
      assert.are.equal(2, rc)
      assert.matches('listeners[1].tls.min_version: expected one of "TLSv1.2", "TLSv1.3"', out, 1,
                     true)
      out, rc = check('certificate = "DIR/alpha.test.crt", key = "DIR/alpha.test.key", cert = 1')
      assert.are.equal(2, rc)
      assert.matches("listeners[1].tls.cert: unknown key", out, 1, true)
    end)

    it("refuses a crl, an ocsp_response or ticket_keys it cannot use, naming the key (exit 2)",
       function()
      local d = certs_dir()
      local base = 'certificate = "DIR/alpha.test.crt", key = "DIR/alpha.test.key", '
      local out, rc = check(base .. 'crl = "DIR/alpha.test.crt"')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.crl: expected it only with client_ca", out,
                     1, true)
      out, rc = check(base .. 'client_ca = "DIR/beta.test.crt", crl = "DIR/beta.test.crt"')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.crl: " .. d .. "/beta.test.crt holds no CRL",
                     out, 1, true)
      out, rc = check(base .. 'client_ca = "DIR/beta.test.crt", crl = "DIR/none.crl"')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.crl: cannot read " .. d .. "/none.crl", out,
                     1, true)
      out, rc = check(base .. 'ocsp_response = "DIR/alpha.test.crt"')
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.ocsp_response: " .. d
                     .. "/alpha.test.crt is not an OCSP response", out, 1, true)
      -- A response for another certificate of the same CA.
      local ca, ca_key = H.make_ca(d, "wrong-ca")
      local one, one_key = H.make_signed_cert(d, "one.test", ca, ca_key)
      local two = H.make_signed_cert(d, "two.test", ca, ca_key)
      H.sh(("cat %s %s >%s/one-chain.crt"):format(H.shq(one), H.shq(ca), H.shq(d)))
      local resp = H.make_ocsp(d, ca, ca_key, two)
      out, rc = check(('certificate = "DIR/one-chain.crt", key = %q, ocsp_response = %q')
        :format(one_key, resp))
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.ocsp_response: " .. resp
                     .. " is not for the certificate " .. d .. "/one-chain.crt", out, 1, true)
      -- The issuer missing from the certificate's file.
      out, rc = check(('certificate = %q, key = %q, ocsp_response = %q')
        :format(one, one_key, H.make_ocsp(d, ca, ca_key, one)))
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.ocsp_response: the issuer of the "
                     .. "certificate is not in " .. one, out, 1, true)
      out, rc = check(base .. ('certificates = { { certificate = "DIR/beta.test.crt", '
                      .. 'key = "DIR/beta.test.key", ocsp_response = %q } }'):format(resp))
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.certificates[1].ocsp_response: ", out, 1,
                     true)
      local short = H.tmpfile("short.key", ("k"):rep(32))
      out, rc = check(base .. ('ticket_keys = { "DIR/none.key", %q }'):format(short))
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.ticket_keys[1]: cannot read " .. d
                     .. "/none.key (No such file or directory)", out, 1, true)
      out, rc = check(base .. ('ticket_keys = { %q }'):format(short))
      assert.are.equal(2, rc, out)
      assert.matches("config error: listeners[1].tls.ticket_keys[1]: " .. short
                     .. " is 32 bytes (expected 80", out, 1, true)
    end)
  end)

  it("resumes a client's session after a reload (the process keeps its ticket keys)", function()
    local p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },' })
    local sess = H.tmpfile("session.pem")
    local function connect(arg)
      -- (stdin stays open a moment: the session's ticket comes after the
      -- handshake, and s_client saves the session it has when it quits)
      local out = H.sh(("(printf 'hi\\n'; sleep 0.5) | timeout 20 openssl s_client -connect "
        .. "127.0.0.1:%d %s %s 2>&1"):format(o.port, arg, H.shq(sess)))
      return out:match("\n(%a+), TLSv1%.3") or ("no session line in: " .. out)
    end
    assert.are.equal("New", connect("-sess_out"))
    assert.are.equal("Reused", connect("-sess_in"))
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 30), H.read(p.log))
    assert.are.equal("Reused", connect("-sess_in"))
    H.stop_sluice(p)
  end)

  it("takes new certificate files on a reload for new connections; open ones keep theirs",
     function()
    local d = certs_dir()
    local live = H.tmpdir() .. "/live_" .. H.free_port()
    H.sh(("mkdir -p %s && cp %s/alpha.test.crt %s/site.crt && cp %s/alpha.test.key %s/site.key")
      :format(H.shq(live), H.shq(d), H.shq(live), H.shq(d), H.shq(live)))
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local p, o = start({ upstream_port = echo.port, cert = live .. "/site.crt",
                         key = live .. "/site.key" })
    local base = H.pool_held(o.admin)
    assert.matches("CN ?= ?alpha%.test", subject(o.port))
    -- A connection opened before the reload.
    local go, out = H.tmpfile("go"), H.tmpfile("held.out", "")
    local script = ("printf 'one\\n'; while [ ! -e %s ]; do sleep 0.02; done; printf 'two\\n'")
      :format(H.shq(go))
    local c = H.spawn(("sh -c %s"):format(H.shq(
      ("(%s) | socat -t 10 - OPENSSL:127.0.0.1:%d,verify=0 >%s"):format(script, o.port, H.shq(out)))),
      "held")
    assert.is_truthy(H.wait_for(function() return H.read(out) == "one\n" end, 30))
    -- A key that does not match: the reload is refused, alpha stays.
    H.sh(("cp %s/beta.test.key %s/site.key"):format(H.shq(d), H.shq(live)))
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function() return H.read(p.log):find("reload refused", 1, true) end,
                                30))
    assert.matches("reload refused, the running configuration stays: config error: "
                   .. "listeners[1].tls.key: ", H.read(p.log), 1, true)
    assert.matches("CN ?= ?alpha%.test", subject(o.port))
    -- Both files new: new connections see beta.
    H.sh(("cp %s/beta.test.crt %s/site.crt"):format(H.shq(d), H.shq(live)))
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 30), H.read(p.log))
    assert.matches("CN ?= ?beta%.test", subject(o.port))
    -- The connection from before goes on.
    H.sh("touch " .. H.shq(go))
    assert.is_truthy(H.wait_for(function() return tonumber(H.read(c.rc_file)) end, 30))
    assert.are.equal("one\ntwo\n", H.read(out))
    assert.is_truthy(H.pool_back(o.admin, base))
    H.stop_sluice(p)
  end)
  it("refuses a client certificate its crl revokes, and a reload takes a new crl", function()
    local d = certs_dir()
    local ca, ca_key = H.make_ca(d, "crl-ca")
    local good, good_key = H.make_signed_cert(d, "good.client", ca, ca_key)
    local bad, bad_key = H.make_signed_cert(d, "bad.client", ca, ca_key)
    local live = H.tmpdir() .. "/live.crl"
    H.sh(("cp %s %s"):format(H.shq(H.make_crl(d, ca, ca_key, { bad })), H.shq(live)))
    local function send(o, what, cert, key)
      local out = H.tmpfile("crl.out")
      H.sh(("printf %s | timeout 20 socat -t 5 - OPENSSL:127.0.0.1:%d,verify=0,cert=%s,key=%s "
            .. ">%s 2>/dev/null"):format(H.shq(what), o.port, H.shq(cert), H.shq(key), H.shq(out)))
      return H.read(out)
    end
    local p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                         tls = ("client_ca = %q, crl = %q,"):format(ca, live) })
    local base = H.pool_held(o.admin)
    assert.are.equal("not revoked", send(o, "not revoked", good, good_key))
    assert.are.equal("", send(o, "revoked", bad, bad_key))
    assert.are.equal(1, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    -- A new CRL revokes the other one too: new connections see it.
    H.sh(("cp %s %s"):format(H.shq(H.make_crl(d, ca, ca_key, { bad, good })), H.shq(live)))
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 30), H.read(p.log))
    assert.are.equal("", send(o, "revoked now", good, good_key))
    assert.are.equal(2, H.metric(o.admin, "sluice_tls_handshake_failures_total",
                                 'listener="secure"'))
    assert.is_truthy(H.pool_back(o.admin, base))
    local log = H.stop_sluice(p)
    local _, n = log:gsub("tls_error %(certificate verify failed: certificate revoked%)", "")
    assert.are.equal(2, n, log)
  end)

  it("staples the OCSP response of the certificate to clients that ask for it", function()
    local d = certs_dir()
    local ca, ca_key = H.make_ca(d, "ocsp-ca")
    local leaf, leaf_key = H.make_signed_cert(d, "stapled.test", ca, ca_key)
    local chain = d .. "/stapled-chain.crt"
    H.sh(("cat %s %s >%s"):format(H.shq(leaf), H.shq(ca), H.shq(chain)))
    local resp = H.make_ocsp(d, ca, ca_key, leaf)
    local function status(o)
      return H.sh(("timeout 20 openssl s_client -connect 127.0.0.1:%d -status </dev/null 2>&1")
        :format(o.port))
    end
    local p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },', cert = chain,
                         key = leaf_key, tls = ("ocsp_response = %q,"):format(resp) })
    local out = status(o)
    assert.matches("OCSP Response Status: successful", out, 1, true)
    assert.matches("Cert Status: good", out, 1, true)
    H.stop_sluice(p)
    -- Without the key: no staple.
    p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },', cert = chain,
                   key = leaf_key })
    out = status(o)
    assert.matches("OCSP response: no response sent", out, 1, true)
    assert.not_matches("Cert Status", out, 1, true)
    H.stop_sluice(p)
    -- In a certificates entry: stapled for the clients that name it.
    p, o = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                   tls = ("certificates = { { certificate = %q, key = %q, ocsp_response = %q } },")
                     :format(chain, leaf_key, resp) })
    out = H.sh(("timeout 20 openssl s_client -connect 127.0.0.1:%d -servername stapled.test "
                .. "-status </dev/null 2>&1"):format(o.port))
    assert.matches("Cert Status: good", out, 1, true)
    assert.matches("OCSP response: no response sent", status(o), 1, true)   -- alpha.test's
    H.stop_sluice(p)
  end)

  describe("ticket_keys", function()
    local function key_file(name)
      local path = H.tmpdir() .. "/" .. name
      H.sh(("openssl rand 80 >%s"):format(H.shq(path)))
      return path
    end
    -- s_client's stdin stays open until the echo of its line is back: the
    -- session's ticket came before it (s_client saves each it gets).
    local function connect(o, sess, arg)
      local log = H.tmpfile("s_client.out", "")
      local input = ("printf 'hi\\n'; i=0; while ! grep -q '^hi$' %s && [ $i -lt 1200 ]; do "
                     .. "sleep 0.05; i=$((i+1)); done"):format(H.shq(log))
      H.sh(("(%s) | timeout 90 openssl s_client -connect 127.0.0.1:%d %s %s >%s 2>&1")
        :format(input, o.port, arg, H.shq(sess), H.shq(log)))
      local out = H.read(log)
      return out:match("\n(%a+), TLSv1%.3") or ("no session line in: " .. out)
    end
    local function tls_keys(list)
      local q = {}
      for i, k in ipairs(list) do q[i] = ("%q"):format(k) end
      return "ticket_keys = { " .. table.concat(q, ", ") .. " },"
    end

    it("resume a session in another sluice process with the same key file", function()
      local k = key_file("shared.key")
      local sess = H.tmpfile("session.pem")
      local p1, o1 = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                             tls = tls_keys({ k }) })
      assert.are.equal("New", connect(o1, sess, "-sess_out"))
      H.stop_sluice(p1)
      local p2, o2 = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                             tls = tls_keys({ k }) })
      assert.are.equal("Reused", connect(o2, sess, "-sess_in"))
      H.stop_sluice(p2)
      -- A process with another key: a full handshake.
      local p3, o3 = start({ listener = 'pipeline = { "sluice.stages.echo" },',
                             tls = tls_keys({ key_file("other.key") }) })
      assert.are.equal("New", connect(o3, sess, "-sess_in"))
      H.stop_sluice(p3)
    end)

    it("rotate: an old key decrypts while listed after the new first one, not once dropped",
       function()
      local old, new = key_file("old.key"), key_file("new.key")
      local cfg_old = { listener = 'pipeline = { "sluice.stages.echo" },', tls = tls_keys({ old }) }
      local p, o = start(cfg_old)
      local sess = H.tmpfile("session.pem")
      assert.are.equal("New", connect(o, sess, "-sess_out"))
      local function reload(keys)
        local text = H.read(p.config):gsub("ticket_keys = {[^}]*},", tls_keys(keys))
        local f = assert(io.open(p.config, "wb"))
        f:write(text)
        f:close()
        local before = select(2, H.read(p.log):gsub("SIGHUP: configuration reloaded", ""))
        os.execute("kill -HUP " .. p.pid)
        assert.is_truthy(H.wait_for(function()
          return select(2, H.read(p.log):gsub("SIGHUP: configuration reloaded", "")) > before
        end, 30), H.read(p.log))
      end
      reload({ new, old })
      assert.are.equal("Reused", connect(o, sess, "-sess_in"))
      reload({ new })
      assert.are.equal("New", connect(o, sess, "-sess_in"))
      H.stop_sluice(p)
    end)
  end)
end)
