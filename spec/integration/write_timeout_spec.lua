-- write_timeout_ms through the real binary: a connection whose peer stops
-- reading (the client, or the upstream) is closed once its bytes have
-- waited that long for the socket, everything it held released; a peer
-- that reads slowly but steadily is not.
local H = require("helpers")

local MiB = 1024 * 1024

local function config(port, admin, upstream_port, access_log, extra)
  return ([[
return {
  workers = 1,
  drain_timeout_ms = 100,
  access_log = %q,
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", %s },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(access_log, admin, port, extra, upstream_port)
end

local function start(upstream_port, extra)
  local port, admin = H.free_port(), H.free_port()
  local access = H.tmpfile("access.log", "")
  local p = H.start_sluice(config(port, admin, upstream_port, access, extra))
  return p, port, admin, access
end


-- The access log's line for the one connection, once it is there.
local function access_line(access)
  return H.wait_for(function() return H.read(access):match("[^\n]*reason=[^\n]*") end, 30)
end

describe("write_timeout_ms", function()
  local peers = H.killed_after_each()

  for _, splice in ipairs({ false, true }) do
    it(("closes a connection whose client keeps sending and never reads (splice = %s), "
        .. "though its idle timeout is shorter"):format(tostring(splice)), function()
      -- The upstream answers the first byte with 64 MiB, far more than the
      -- kernel's buffers and the outbound queue hold, and reads nothing more.
      local up = H.start_peer("head -c 1 >/dev/null; head -c 67108864 /dev/zero")
      peers[#peers + 1] = up
      local p, port, admin, access = start(up.port, ("splice = %s, idle_timeout_ms = 1000, "
        .. "write_timeout_ms = 2000"):format(tostring(splice)))
      local base = H.pool_held(admin)
      local c = H.connect(port, { rcvbuf = 4096 })
      c.send("x")
      -- A line every 50 ms: bytes keep moving from the client, so the idle
      -- timeout (1 s) never comes; the bytes sluice writes to it wait.
      local line = H.wait_for(function()
        pcall(c.send, "more\n")   -- (fails once sluice has closed: not what is checked)
        H.sleep(0.03)
        return H.read(access):match("[^\n]*reason=[^\n]*")
      end, 30)
      assert.is_truthy(line, H.read(p.log))
      assert.matches('reason="write_timeout"$', line)
      assert.matches("listener=front ", line, 1, true)
      local log = H.read(p.log)
      assert.matches("client 127%.0%.0%.1:%d+ on front closed: write_timeout %(", log)
      assert.matches("upstream 127%.0%.0%.1:" .. up.port
                     .. " for front closed: peer closed: write_timeout %(", log)
      assert.not_matches("idle_timeout", log, 1, true)
      -- Every buffer either side held is back in the pool, at once.
      assert.is_truthy(H.wait_for(function()
        local now = H.pool_held(admin)
        return now[1] == base[1] and now[2] == base[2]
      end, 10), H.read(p.log))
      assert.are.equal(0, H.metric(admin, "sluice_outbound_queued_bytes", 'listener="front"'))
      assert.are.equal(1, H.metric(admin, "sluice_write_timeouts_total", 'worker="0"'))
      c.close()
      H.stop_sluice(p)   -- exit 0, pool clean, no leak
    end)
  end

  it("leaves a client that reads slowly but steadily alone", function()
    -- 16 MiB, read 64 KiB at a time with a pause of 10 ms after each read.
    -- Once the kernel's buffers are full (a few MiB), sluice's queue waits
    -- on the socket for the rest of the transfer, several times
    -- write_timeout_ms; each EV_WRITE writes part of it (the high water mark
    -- is far above what one wake-up writes, so the queue never empties on
    -- the way), and no pause of the reader comes near the timeout.
    local total = 16 * MiB
    local up = H.start_peer(("head -c 1 >/dev/null; head -c %d /dev/zero"):format(total),
                            nil, "-t 30")
    peers[#peers + 1] = up
    local p, port, admin, access = start(up.port, "write_timeout_ms = 500, "
      .. "high_water_mark = 8388608, low_water_mark = 4194304")
    local base = H.pool_held(admin)
    local c = H.connect(port, { rcvbuf = 131072 })
    c.send("x")
    local got, deadline = 0, H.now() + 120
    while got < total and H.now() < deadline do
      local part = c.recv(65536, 30)
      if part == nil or part == "" then break end
      got = got + #part
      H.sleep(0.01)
    end
    assert.are.equal(total, got)
    assert.are.equal("", c.recv(1, 10))   -- the upstream's FIN, passed on
    c.close()
    local line = access_line(access)
    assert.is_truthy(line, H.read(p.log))
    assert.matches(("bytes_out=%d "):format(total), line, 1, true)
    assert.not_matches("write_timeout", line, 1, true)
    -- It lasted well beyond write_timeout_ms: progress restarted the clock.
    assert.is_true(tonumber(line:match("duration_ms=(%d+)")) > 1500, line)
    assert.is_truthy(H.wait_for(function()
      local now = H.pool_held(admin)
      return now[1] == base[1] and now[2] == base[2]
    end, 10))
    assert.are.equal(0, H.metric(admin, "sluice_write_timeouts_total", 'worker="0"'))
    local log = H.stop_sluice(p)
    assert.not_matches("write_timeout", log, 1, true)
  end)

  it("closes a connection whose upstream stops reading while the client sends", function()
    -- The upstream's kernel completes the connect and nothing ever reads it.
    local up = H.raw_listener()
    local p, port, admin, access = start(up.port, "write_timeout_ms = 500")
    local base = H.pool_held(admin)
    local flood = H.spawn(("head -c 67108864 /dev/zero | socat -u - TCP:127.0.0.1:%d"):format(port),
                          "flood")
    local line = access_line(access)
    assert.is_truthy(line, H.read(p.log))
    assert.matches('reason="peer closed: write_timeout"$', line)
    local log = H.read(p.log)
    assert.matches("upstream 127%.0%.0%.1:" .. up.port .. " for front closed: write_timeout %(", log)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed: write_timeout %(", log)
    assert.is_truthy(H.wait_for(function()
      local now = H.pool_held(admin)
      return now[1] == base[1] and now[2] == base[2]
    end, 10), H.read(p.log))
    assert.are.equal(1, H.metric(admin, "sluice_write_timeouts_total", 'worker="0"'))
    H.stop(flood, "KILL")
    up.close()
    H.stop_sluice(p)
  end)

  it("takes a new value on SIGHUP for new connections; open ones keep theirs", function()
    local up = H.start_peer("head -c 1 >/dev/null; head -c 67108864 /dev/zero")
    peers[#peers + 1] = up
    local p, port, admin, access = start(up.port, "write_timeout_ms = 600000")
    -- A client that reads nothing, under the first value (10 minutes): its
    -- bytes wait in sluice's queue.
    local old = H.connect(port, { rcvbuf = 4096 })
    old.send("x")
    assert.is_truthy(H.wait_for(function()
      return (H.metric(admin, "sluice_outbound_queued_bytes", 'listener="front"') or 0) > 0
    end, 10))
    local f = assert(io.open(p.config, "w"))
    f:write(config(port, admin, up.port, access, "write_timeout_ms = 300"))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    -- The same kind of client after the reload is closed at the new value.
    local new = H.connect(port, { rcvbuf = 4096 })
    new.send("x")
    local line = access_line(access)
    assert.is_truthy(line, H.read(p.log))
    assert.matches('reason="write_timeout"$', line)
    -- The first one is still open (one access log line, one connection).
    assert.are.equal(1, select(2, H.read(access):gsub("\n", "")))
    assert.are.equal(1, H.metric(admin, "sluice_connections_open", 'listener="front"'))
    assert.are.equal(1, H.metric(admin, "sluice_write_timeouts_total", 'worker="0"'))
    new.close()
    -- The other way round: one opened under a short value keeps it when a
    -- reload makes the value long (closed at 2 s, not 10 minutes).
    local function reload(value, nth)
      local g = assert(io.open(p.config, "w"))
      g:write(config(port, admin, up.port, access, "write_timeout_ms = " .. value))
      g:close()
      os.execute("kill -HUP " .. p.pid)
      assert.is_truthy(H.wait_for(function()
        return select(2, H.read(p.log):gsub("configuration reloaded", "")) == nth
      end, 30), H.read(p.log))
    end
    reload(2000, 2)
    local mid = H.connect(port, { rcvbuf = 4096 })
    mid.send("x")
    reload(600000, 3)
    assert.is_truthy(H.wait_for(function()
      return select(2, H.read(access):gsub('reason="write_timeout"', "")) == 2
    end, 60), H.read(access))
    assert.are.equal(1, H.metric(admin, "sluice_connections_open", 'listener="front"'))
    mid.close()
    H.stop_sluice(p)   -- the first one closes at the drain deadline
    assert.matches('reason="shutdown"', H.read(access):match("[^\n]*\n?$"))
    old.close()
  end)
end)
