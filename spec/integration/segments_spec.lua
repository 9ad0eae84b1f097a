-- What sluice puts on the wire for a short connection, counted by the
-- kernel's own TCP_INFO on the spec's sockets: a FIN passed on leaves with
-- the last bytes, and an upstream's handshake ACK goes with the first bytes
-- (or at once, when there are none). Real sockets on 127.0.0.1; the upstream
-- is driven from the spec so that it can send its FIN with its bytes or
-- after them.
local H = require("helpers")
local ffi = require("ffi")

pcall(ffi.cdef, "long send(int fd, const void *buf, unsigned long n, int flags);")
pcall(ffi.cdef, "int shutdown(int fd, int how);")
pcall(ffi.cdef, "int getsockopt(int fd, int level, int name, void *val, unsigned int *len);")

local MSG_MORE, MSG_NOSIGNAL = 0x8000, 0x4000

-- Segments received on fd so far (struct tcp_info's tcpi_segs_in).
local function segs_in(fd)
  local info = ffi.new("uint8_t[232]")
  local len = ffi.new("unsigned int[1]", 232)
  assert(ffi.C.getsockopt(fd, 6, 11, info, len) == 0, "TCP_INFO refused") -- IPPROTO_TCP, TCP_INFO
  assert(len[0] >= 144, "TCP_INFO without tcpi_segs_in")
  return ffi.cast("uint32_t *", info + 140)[0]
end

local function config(port, deferred_port, abrupt_port, upstream_port, admin, pipeline)
  -- "deferred" (defer_accept): sluice takes a client once its first bytes
  -- are there, so that they are there when it connects upstream. "abrupt"
  -- (half_close = false): the first FIN ends the pair.
  return ([[
return {
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = %s },
    { name = "deferred", listen = "127.0.0.1:%d", upstream = "back", defer_accept = true },
    { name = "abrupt", listen = "127.0.0.1:%d", upstream = "back", half_close = false },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(admin, port, pipeline or "{}", deferred_port, abrupt_port, upstream_port)
end

describe("segments on the wire", function()
  local up, p, admin, base

  local function start(pipeline)
    up = H.raw_listener()
    local port, deferred, abrupt
    port, deferred, abrupt, admin = H.free_port(), H.free_port(), H.free_port(), H.free_port()
    p = H.start_sluice(config(port, deferred, abrupt, up.port, admin, pipeline))
    base = H.pool_held(admin)
    return port, deferred, abrupt
  end

  after_each(function()
    if up then up.close() end
    if p then
      assert.is_truthy(H.pool_back(admin, base), "the pool is back where it started")
      H.stop_sluice(p)
    end
    up, p = nil, nil
  end)

  -- One request and its answer, the upstream ending the connection; joined:
  -- the upstream sends its answer and its FIN in one segment, else the FIN
  -- once the client has the answer. Returns the segments the client got,
  -- the client's connection (still open) and the upstream's socket.
  local function exchange_open(port, joined)
    local c = H.connect(port)
    c.send("ask")
    local s = assert(up.accept(10), "sluice connected upstream")
    assert.are.equal("ask", up.read(s, 10))
    if joined then
      assert(ffi.C.send(s, "answer", 6, MSG_MORE + MSG_NOSIGNAL) == 6)
      ffi.C.shutdown(s, 1)
      assert.are.equal("answer", c.recv(6, 10))
    else
      assert(ffi.C.send(s, "answer", 6, MSG_NOSIGNAL) == 6)
      assert.are.equal("answer", c.recv(6, 10))
      ffi.C.shutdown(s, 1)
    end
    assert.are.equal("", c.recv(1, 10))   -- the FIN sluice passed on
    return segs_in(c.fd), c, s
  end

  local function one_exchange(port, joined)
    local n, c, s = exchange_open(port, joined)
    c.close()
    ffi.C.close(s)
    return n
  end

  for _, pipeline in ipairs({ "{}", '{ "examples.stages.log_chunks" }' }) do
    it("passes an upstream's FIN on with its last bytes in one segment, pipeline " .. pipeline,
      function()
        local port = start(pipeline)
        local apart = one_exchange(port, false)
        local joined = one_exchange(port, true)
        -- Apart: the answer and the FIN in two segments; joined, in one.
        assert.are.equal(apart - 1, joined)
      end)
  end

  it("with half_close = false, closes the client at an upstream's FIN that came with its last bytes",
    function()
      local _, _, abrupt = start()
      -- The n-th line of sluice's log that matches pattern, or nil.
      local function nth(pattern, n)
        local k = 0
        for line in H.read(p.log):gmatch("[^\n]+") do
          if line:find(pattern) then
            k = k + 1
            if k == n then return line end
          end
        end
      end
      for n, joined in ipairs({ false, true }) do
        local _, c, s = exchange_open(abrupt, joined)
        -- The upstream's side is closed ("eof"); the client's closes with
        -- it once the client has acknowledged its bytes, without waiting for
        -- the client's FIN: a byte the client sends now is not read (it
        -- would be, and dropped, by a connection lingering for that FIN).
        assert.is_truthy(H.wait_for(function() return nth("for abrupt closed: eof", n) end, 10))
        c.send("x")
        c.close()
        ffi.C.close(s)
        local line = H.wait_for(function() return nth("on abrupt closed: ", n) end, 10)
        assert.matches("peer closed %(in 3 B, out 6 B", line)
      end
    end)

  it("writes what a stage flushes at the end of input before the stage's close", function()
    -- The stage answers the client's FIN and closes. Its bytes and its FIN
    -- wait in sluice's socket together (sluice stopped meanwhile), so that
    -- one read burst finds both: its writes are held until the FIN has been
    -- handled, and the close must not drop them.
    local stage = H.tmpfile("answers_at_end.lua", [[
return {
  channel_read = function(ctx, buf) buf:release() end,
  user_event = function(ctx, name)
    if name == "input_closed" then
      ctx:write_and_flush("bye\n")
      ctx:close("answered")
    end
  end,
}
]])
    local port = H.free_port()
    admin = H.free_port()
    p = H.start_sluice(([[
return {
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "svc", listen = "127.0.0.1:%d", pipeline = { %q } } },
}
]]):format(admin, port, stage:match("([^/]+)%.lua$")))
    base = H.pool_held(admin)
    H.sh("kill -STOP " .. p.pid)
    local c = H.connect(port)
    c.send(("a"):rep(2048))   -- one full read (the first read's size), then the FIN
    c.shutdown()
    H.sh("kill -CONT " .. p.pid)
    assert.are.equal("bye\n", c.recv(4, 10))
    assert.are.equal("", c.recv(1, 10))
    c.close()
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):match("on svc closed: answered %(in 2048 B, out 4 B, [^\n]*%)\n")
    end, 10), H.read(p.log))
  end)

  it("sends an upstream's handshake ACK with the client's first bytes", function()
    local port, deferred = start()
    -- Early: the client's bytes are there when sluice connects upstream.
    local c = H.connect(deferred)
    c.send("ask")
    local s = assert(up.accept(10))
    assert.are.equal("ask", up.read(s, 10))
    local early = segs_in(s)
    c.close()
    ffi.C.close(s)
    -- Late: they come once the upstream's connection is established, so
    -- its ACK has gone alone.
    c = H.connect(port)
    s = assert(up.accept(10))
    c.send("ask")
    assert.are.equal("ask", up.read(s, 10))
    local late = segs_in(s)
    c.close()
    ffi.C.close(s)
    assert.are.equal(late - 1, early)
  end)

  it("lets the handshake's ACK go at once to an upstream that speaks first", function()
    local port = start()
    -- The client says nothing: sluice has nothing to send with the ACK.
    local c = H.connect(port)
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_upstream_connects_total", 'upstream="back"') == 1
    end, 10))
    -- sluice answered /metrics after its connect callback: the ACK is out, so
    -- the upstream's side is established and accepted at once (not held
    -- half-open for the 200 ms of a delayed ACK).
    local s = up.accept(0)
    assert.is_not_nil(s, "the upstream's connection is still half-open")
    assert(ffi.C.send(s, "hello", 5, MSG_NOSIGNAL) == 5)
    assert.are.equal("hello", c.recv(5, 10))
    c.close()
    ffi.C.close(s)
  end)
end)
