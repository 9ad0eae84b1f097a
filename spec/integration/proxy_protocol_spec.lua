-- sluice.proxy_protocol through the real binary: a PROXY protocol header
-- (v1 text, v2 binary, split across reads) gives the connection its real
-- client address (logs, hash balancing); a bad header closes only its
-- connection. Real socat peers on 127.0.0.1; every wait is bounded.
local bit = require("bit")
local H = require("helpers")

local function be16(n) return string.char(bit.rshift(n, 8), bit.band(n, 0xff)) end

-- A v2 PROXY header for TCP over IPv4.
local function v2(src, dst, sport, dport)
  local function ip(s)
    local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    return string.char(tonumber(a), tonumber(b), tonumber(c), tonumber(d))
  end
  return "\r\n\r\n\0\r\nQUIT\n" .. "\x21\x11" .. be16(12) .. ip(src) .. ip(dst) .. be16(sport)
         .. be16(dport)
end

local function config(port, admin, servers, balance)
  local list = {}
  for i, s in ipairs(servers) do list[i] = ('"127.0.0.1:%d"'):format(s) end
  return ([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { "sluice.proxy_protocol" } } },
  upstreams = { back = { servers = { %s }, balance = %q } },
}
]]):format(admin, port, table.concat(list, ", "), balance or "round_robin")
end

describe("sluice.proxy_protocol", function()
  local peers = H.killed_after_each()

  it("takes the client address from a v1 or v2 header and passes the rest on", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, { echo.port }))
    local out, rc = H.exchange(port, "PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nhello\n", 10)
    assert.are.equal(0, rc)
    assert.are.equal("hello\n", out)
    out = H.exchange(port, v2("198.51.100.9", "10.0.0.1", 40000, 443) .. "binary\n", 10)
    assert.are.equal("binary\n", out)
    out = H.exchange(port, "PROXY TCP6 2001:db8::5 2001:db8::1 6000 443\r\nsix\n", 10)
    assert.are.equal("six\n", out)
    -- A header in pieces, each read by sluice before the next is sent.
    local base = H.metric(admin, "sluice_received_bytes_total", 'listener="front"')
    local c = H.connect(port)
    local header = "PROXY TCP4 192.0.2.44 10.0.0.1 1234 443\r\n"
    c.send(header:sub(1, 9))
    assert.is_true(H.wait_received(admin, "front", base + 9))
    c.send(header:sub(10, 30))
    assert.is_true(H.wait_received(admin, "front", base + 30))
    c.send(header:sub(31) .. "pieces\n")
    assert.are.equal("pieces\n", c.recv(7, 10))
    c.close()
    local log = H.stop_sluice(p)
    assert.matches("client 203.0.113.7:51234 on front closed: eof", log, 1, true)
    assert.matches("client 198.51.100.9:40000 on front closed: eof", log, 1, true)
    assert.matches("client [2001:db8::5]:6000 on front closed: eof", log, 1, true)
    assert.matches("client 192.0.2.44:1234 on front closed", log, 1, true)
  end)

  it("closes a connection whose header is bad, releasing what it read; others carry on", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, { echo.port }))
    local held = H.connect(port)
    held.send("PROXY TCP4 192.0.2.1 10.0.0.1 1000 443\r\nfirst\n")
    assert.are.equal("first\n", held.recv(6, 10))
    local bad = {
      { "GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header" },
      { "PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\nx", "bad source address" },
      { "PROXY TCP4 192.0.2.1 10.0.0.1 99999 2\r\nx", "bad source port" },
      { "PROXY TCP4 1.2.3.4 not-an-address 1000 not-a-port\r\nhello\n", "bad destination address" },
      { "PROXY TCP4 1.2.3.4 127.0.0.1 1000 not-a-port\r\nhello\n", "bad destination port" },
      -- Not "world\n" upstream with "hello" taken into the header.
      { "PROXY TCP4 1.2.3.4 127.0.0.1 1000 27162\nhello\r\nworld\n", "v1 line not ended by CRLF" },
      { "PROXY    TCP4  1.2.3.4   127.0.0.1 1000 27162\r\nhello\n", "not one space between fields" },
      { "PROXY " .. ("x"):rep(120), "v1 line longer than 107 bytes" },
      { "\r\n\r\n\0\r\nQUIT\n\x31\x11\0\0", "unknown version" },
      { "PROXY TCP4 192.0.2.1", "the client closed before the header was complete" },
    }
    for _, b in ipairs(bad) do
      local out = H.exchange(port, b[1], 10)
      assert.are.equal("", out)
    end
    held.send("still here\n")
    assert.are.equal("still here\n", held.recv(11, 10))
    held.close()
    local log = H.stop_sluice(p)
    for _, b in ipairs(bad) do
      assert.matches("closed: bad PROXY protocol header (" .. b[2] .. ")", log, 1, true)
    end
    -- No upstream connection was made for a bad header.
    assert.are.equal(1, select(2, log:gsub("upstream 127%.0%.0%.1:%d+ for front closed", "")))
  end)

  it("balances by the address in the header with balance = hash", function()
    local a = H.start_peer("printf A; cat")
    local b = H.start_peer("printf B; cat")
    peers[#peers + 1], peers[#peers + 2] = a, b
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, { a.port, b.port }, "hash"))
    local seen, by_ip = {}, {}
    for i = 1, 20 do
      local ip = ("192.0.2.%d"):format(i)
      local out = H.exchange(port, ("PROXY TCP4 %s 10.0.0.1 5000 443\r\nx"):format(ip), 10)
      local who = out:sub(1, 1)
      seen[who] = (seen[who] or 0) + 1
      by_ip[ip] = who
    end
    -- The same address again goes where it went.
    for i = 1, 20, 5 do
      local ip = ("192.0.2.%d"):format(i)
      local out = H.exchange(port, ("PROXY TCP4 %s 10.0.0.1 6000 443\r\nx"):format(ip), 10)
      assert.are.equal(by_ip[ip], out:sub(1, 1))
    end
    H.stop_sluice(p)
    -- From one real address (127.0.0.1) hash would pick one server for all.
    assert.is_true((seen.A or 0) > 0 and (seen.B or 0) > 0, "spread: " .. tostring(seen.A) .. "/" ..
                   tostring(seen.B))
  end)
end)

describe("sluice.proxy_protocol before a Lua stage", function()
  it("gives the stage the header's address from channel_active on (ctx:channel())", function()
    local stage = H.tmpfile("where.lua", [[
local log = require("sluice.log")
return {
  channel_active = function(ctx)
    local ch = ctx:channel()
    log.info("active: remote %s local %s", ch:remote_address(), ch:local_address())
    ctx:fire_active()
  end,
  channel_read = function(ctx, buf)
    ctx:write(buf)
    ctx:flush()
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local port = H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { "sluice.proxy_protocol", %q } } },
}
]]):format(port, mod))
    local out = H.exchange(port, "PROXY TCP4 198.51.100.23 10.0.0.1 4711 443\r\nback\n", 10)
    assert.are.equal("back\n", out)
    local log = H.stop_sluice(p)
    assert.matches("active: remote 198.51.100.23:4711 local 127.0.0.1:" .. port, log, 1, true)
  end)
end)

describe("send_proxy", function()
  local peers = H.killed_after_each()

  -- sluice with a listener "front" (pipeline given as Lua text) to a raw
  -- listener, with send_proxy v1. Returns sluice, front's port, the listener.
  local function front_to_raw(pipeline)
    local raw = H.raw_listener()
    local port = H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = %s } },
  upstreams = { back = { servers = { "127.0.0.1:%d" }, send_proxy = "v1" } },
}
]]):format(port, pipeline, raw.port))
    return p, port, raw
  end

  it("sends a v1 header before the client's bytes", function()
    local p, port, raw = front_to_raw("{}")
    local c = H.connect(port)
    local fd = raw.accept(10)
    assert.is_truthy(fd)
    -- The header comes before the client says anything (a server that
    -- speaks first gets it), then the client's bytes.
    local got = ""
    while not got:find("\r\n", 1, true) do
      local more = raw.read(fd, 10)
      if not more or more == "" then break end
      got = got .. more
    end
    assert.matches(("^PROXY TCP4 127%%.0%%.0%%.1 127%%.0%%.0%%.1 %%d+ %d\r\n$"):format(port), got)
    c.send("hello\n")
    assert.are.equal("hello\n", raw.read(fd, 10))
    raw.reset(fd)
    c.close()
    raw.close()
    H.stop_sluice(p)
  end)

  it("carries an IPv6 client read from a header on an IPv4 listener, its own address mapped", function()
    local p, port, raw = front_to_raw('{ "sluice.proxy_protocol" }')
    local c = H.connect(port)
    c.send("PROXY TCP6 2001:db8::7 2001:db8::1 4321 443\r\nhello\n")
    local fd = raw.accept(10)
    assert.is_truthy(fd)
    local want = ("PROXY TCP6 2001:db8::7 ::ffff:127.0.0.1 4321 %d\r\nhello\n"):format(port)
    local got = ""
    while #got < #want do
      local more = raw.read(fd, 10)
      if not more or more == "" then break end
      got = got .. more
    end
    assert.are.equal(want, got)
    raw.reset(fd)
    c.close()
    raw.close()
    local log = H.stop_sluice(p)
    assert.matches("client [2001:db8::7]:4321 on front closed", log, 1, true)
  end)

  it("carries the client's address through a second sluice that reads v2, health checks included", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local front, back = H.free_port(), H.free_port()
    -- The second sluice reads the header, then echoes through its upstream.
    local b = H.start_sluice(([[
return {
  workers = 1,
  listeners = { { name = "inner", listen = "127.0.0.1:%d", upstream = "echo",
                  pipeline = { "sluice.proxy_protocol" } } },
  upstreams = { echo = { servers = { "127.0.0.1:%d" } } },
}
]]):format(back, echo.port))
    -- The first sends v2, and its health checks (send/expect through the
    -- second, which would refuse them without a header) send LOCAL first.
    local a = H.start_sluice(([[
return {
  workers = 1,
  listeners = { { name = "outer", listen = "127.0.0.1:%d", upstream = "inner" } },
  upstreams = { inner = { servers = { "127.0.0.1:%d" }, send_proxy = "v2",
                          health_check = { interval_ms = 1000, timeout_ms = 1000, fails = 1,
                                           send = "ping\n", expect = "ping" } } },
}
]]):format(front, back))
    -- A few checks have passed through the second sluice.
    assert.is_truthy(H.wait_for(function()
      local _, n = H.read(b.log):gsub("on inner closed: eof %(in 21 B, out 5 B", "")
      return n >= 3 -- a LOCAL header (16 B) and "ping\n" in, "ping\n" back
    end, 10), H.read(b.log))
    for i = 1, 3 do
      local out = H.exchange(front, "through " .. i .. "\n", 10)
      assert.are.equal("through " .. i .. "\n", out)
    end
    local alog = H.stop_sluice(a)
    local blog = H.stop_sluice(b)
    assert.not_matches("is down", alog, 1, true)
    assert.not_matches("bad PROXY protocol header", blog, 1, true)
    -- Each client port the first sluice saw is the client the second one logged.
    local n = 0
    for cport in alog:gmatch("client 127%.0%.0%.1:(%d+) on outer closed") do
      assert.matches("client 127%.0%.0%.1:" .. cport .. " on inner closed", blog)
      n = n + 1
    end
    assert.are.equal(3, n)
  end)

  it("is refused unless v1 or v2", function()
    local cfg = H.tmpfile("sp.lua", [[
return { listeners = { { name = "f", listen = "127.0.0.1:1", upstream = "u" } },
         upstreams = { u = { servers = { "127.0.0.1:2" }, send_proxy = true } } }
]])
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal('config error: upstreams.u.send_proxy: expected "v1" or "v2", got true\n', out)
  end)
end)

describe("sluice.proxy_protocol in the config", function()
  it("is refused anywhere but first in a pipeline", function()
    local cfg = H.tmpfile("pp.lua", [[
return { listeners = { { name = "f", listen = "127.0.0.1:1",
  pipeline = { "sluice.stages.echo", "sluice.proxy_protocol" } } } }
]])
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal('config error: listeners[1].pipeline[2]: expected "sluice.proxy_protocol" only '
                     .. "as the first stage (the header comes before any other byte), got it at 2\n", out)
  end)
end)
