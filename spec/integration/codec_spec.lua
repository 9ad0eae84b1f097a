-- The C frame codecs through the real binary: a line codec in front of the
-- echo stage, a length field decoder and prepender around a socat echo
-- upstream; an oversized frame closes only its own connection, with the
-- reason logged; bad codec options stop `sluice --check` with exit 2.
local ffi = require("ffi")
local bit = require("bit")
local H = require("helpers")

pcall(ffi.cdef, [[
long write(int fd, const void *buf, unsigned long n);
]])
local C = ffi.C

-- A client connection to 127.0.0.1:port, driven from the spec.
local function connect(port)
  local fd = C.socket(2, 1, 0)
  assert(fd >= 0)
  local sa = ffi.new("struct sl_spec_sockaddr_in")
  sa.family = 2
  sa.addr = 0x0100007f
  sa.port = bit.bor(bit.lshift(bit.band(port, 0xff), 8), bit.rshift(port, 8))
  assert(C.connect(fd, sa, ffi.sizeof(sa)) == 0, "connect failed")
  local c = { fd = fd }
  function c.send(s)
    assert(C.write(fd, s, #s) == #s)
  end
  -- Reads until n bytes arrived (or EOF, or timeout); returns them.
  function c.recv(n, timeout)
    local got, buf = {}, ffi.new("char[4096]")
    local have = 0
    local deadline = os.time() + (timeout or 10)
    while have < n and os.time() <= deadline do
      local p = ffi.new("struct sl_spec_pollfd[1]")
      p[0].fd, p[0].events = fd, 1
      if C.poll(p, 1, 200) > 0 then
        local r = C.read(fd, buf, 4096)
        if r <= 0 then break end
        got[#got + 1] = ffi.string(buf, r)
        have = have + r
      end
    end
    return table.concat(got)
  end
  -- True once the server closed the connection (EOF or reset).
  function c.closed(timeout)
    return H.wait_for(function()
      local p = ffi.new("struct sl_spec_pollfd[1]")
      p[0].fd, p[0].events = fd, 1
      if C.poll(p, 1, 100) <= 0 then return false end
      local buf = ffi.new("char[256]")
      return C.read(fd, buf, 256) <= 0
    end, timeout or 10)
  end
  function c.close() C.close(fd) end
  return c
end

local function be16(n) return string.char(bit.rshift(n, 8), bit.band(n, 0xff)) end

describe("frame codecs", function()
  local peers, clients = {}, {}
  after_each(function()
    for _, c in ipairs(clients) do c.close() end
    for _, p in ipairs(peers) do H.stop(p, "KILL") end
    peers, clients = {}, {}
  end)
  local function client(port)
    local c = connect(port)
    clients[#clients + 1] = c
    return c
  end

  it("a line codec before the echo stage: lines in pieces come back whole; an oversized "
     .. "line closes only its connection", function()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "lines", listen = "127.0.0.1:%d",
      pipeline = { { "sluice.codec.line", max_length = 16, strip_delimiter = false },
                   "sluice.stages.echo" } },
  },
}
]]):format(admin, port))
    local a = client(port)
    a.send("hel")
    -- sluice has read the first piece before the rest is sent: two reads.
    assert.is_true(H.wait_received(admin, "lines", 3))
    a.send("lo\r\nwor")
    assert.are.equal("hello\r\n", a.recv(7))
    a.send("ld\n")
    assert.are.equal("world\n", a.recv(6))

    local b = client(port)
    b.send("fine\n" .. ("x"):rep(40) .. "\n")
    assert.is_truthy(b.closed())

    a.send("still here\n")
    assert.are.equal("still here\n", a.recv(11))
    a.close()
    local log = H.stop_sluice(p)
    assert.matches("on lines closed: frame_too_large", log, 1, true)
    local closes = select(2, log:gsub("closed: frame_too_large", ""))
    assert.are.equal(1, closes)
  end)

  it("a length field decoder and prepender around an echo upstream", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "framed", listen = "127.0.0.1:%d", upstream = "back",
      pipeline = {
        { "sluice.codec.length_field", max_frame_length = 1024, length_field_length = 2,
          initial_bytes_to_strip = 2 },
        { "sluice.codec.length_field_prepender", length_field_length = 2 },
      } },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(admin, port, echo.port))
    local a = client(port)
    -- A frame in three reads: the upstream sees the body only, and what it
    -- sends back gets its length field again.
    a.send(be16(5):sub(1, 1))
    assert.is_true(H.wait_received(admin, "framed", 1))
    a.send(be16(5):sub(2) .. "he")
    assert.is_true(H.wait_received(admin, "framed", 4))
    a.send("llo")
    assert.are.equal(be16(5) .. "hello", a.recv(7))
    local body = ("0123456789"):rep(100)
    a.send(be16(#body) .. body)
    assert.are.equal(be16(#body) .. body, a.recv(2 + #body))

    local b = client(port)
    b.send(be16(2000) .. "too long")
    assert.is_truthy(b.closed())
    a.send(be16(2) .. "ok")
    assert.are.equal(be16(2) .. "ok", a.recv(4))
    a.close()
    local log = H.stop_sluice(p)
    assert.matches("on framed closed: frame_too_large", log, 1, true)
  end)

  it("bad codec options stop --check with the key path and exit 2", function()
    local cfg = H.tmpfile("bad_codec.lua", [[
return { listeners = { { name = "x", listen = "127.0.0.1:7000",
  pipeline = { "sluice.stages.echo", { "sluice.codec.line", max_length = 0 } } } } }
]])
    local out, rc = H.sh(("SLUICE_ROOT=%s %s --check %s 2>&1"):format(H.shq(H.root),
                                                                       H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.matches("config error: listeners[1].pipeline[2].max_length: expected a positive "
                   .. "integer, got 0", out, 1, true)
  end)
end)
