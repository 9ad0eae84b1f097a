-- The proxy through the real binary, with real peers (socat) on loopback.
local H = require("helpers")

local function proxy_config(port, upstream_port, pipeline)
  return ([[
return {
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = %s },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" }, connect_timeout_ms = 2000 } },
}
]]):format(port, pipeline or "{}", upstream_port)
end

describe("proxying", function()
  local peers = H.killed_after_each()

  local function digest(path)
    return (H.sh("sha256sum < " .. H.shq(path))):match("^(%x+)")
  end

  local variants = {
    { pipeline = "{}" },
    { pipeline = '{ "examples.stages.log_chunks" }' },
    { pipeline = '{ "examples.stages.log_chunks" }', env = "SLUICE_ALLOCATOR=unpooled" },
  }
  for _, v in ipairs(variants) do
    it(("carries 16 MiB of random bytes to an echo peer and back intact, pipeline %s%s")
      :format(v.pipeline, v.env and (", " .. v.env) or ""), function()
        local echo = H.start_echo()
        peers[#peers + 1] = echo
        local port = H.free_port()
        local p = H.start_sluice(proxy_config(port, echo.port, v.pipeline), v.env)
        local input = H.tmpfile("random.bin")
        H.sh(("head -c %d /dev/urandom > %s"):format(16 * 1024 * 1024, H.shq(input)))
        local _, rc, out = H.exchange(port, { file = input }, 60)
        assert.are.equal(0, rc)
        assert.are.equal(16 * 1024 * 1024, #H.read(out))
        assert.are.equal(digest(input), digest(out))
        local log = H.stop_sluice(p)
        assert.matches(v.env and "unpooled allocator" or "pooled allocator", log, 1, true)
      end)
  end

  it("with defer_accept, leaves a silent client to the kernel until it speaks, then proxies it", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, echo.port)
      :gsub('upstream = "back",', 'upstream = "back", defer_accept = true,')))
    local function on_port(state)
      return (H.sh(("ss -tnH state %s 'sport = :%d'"):format(state, port))):match("%S") ~= nil
    end
    -- A client that connects and says nothing for a while.
    local input = H.tmpfile("late.sh", "sleep 0.5; printf hello")
    local client = H.spawn(("(sh %s | socat -t 5 - TCP:127.0.0.1:%d > %s)"):format(
      H.shq(input), port, H.shq(H.tmpfile("late.out"))), "client")
    -- Connected from its side, not yet handed to sluice: the kernel holds it
    -- half-open (SYN-RECV) instead of established and accepted.
    assert.is_truthy(H.wait_for(function() return on_port("syn-recv") end, 5))
    assert.is_false(on_port("established"))
    assert.are.equal(0, H.stop(client, "CONT", 20))   -- waits for its end
    local out = H.exchange(port, "again", 10)
    local log = H.stop_sluice(p)
    assert.are.equal("again", out, log)
    assert.matches("client 127.0.0.1:%d+ on front closed", log)
  end)

  it("passes the client's FIN to the upstream, and the reply still arrives", function()
    -- wc -c answers only after end of input: the reply proves the FIN got through.
    local peer = H.start_peer("wc -c")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, peer.port, '{ "examples.stages.log_chunks" }'))
    local out, rc = H.exchange(port, "hello\n", 10)
    assert.are.equal(0, rc)
    assert.are.equal("6", out:match("^%s*(%d+)%s*$"))
    local log = H.stop_sluice(p)
    assert.matches("chunk of 6 bytes", log)
  end)

  it("closes a connection whose client sent its FIN at half_close_timeout_ms", function()
    -- The peer takes everything up to the FIN, then keeps its side open:
    -- only the half-close timeout (not the long idle one) ends it.
    local peer = H.start_peer("cat > /dev/null; sleep 10")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, peer.port):gsub('upstream = "back",',
      'upstream = "back", idle_timeout_ms = 600000, half_close_timeout_ms = 300,')))
    local _, rc = H.exchange(port, "hello\n", 20)
    assert.are.equal(0, rc)
    local log = H.stop_sluice(p)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: half_close_timeout %(in 6 B, out 0 B", log)
  end)

  it("closes a connection whose upstream sent its FIN at half_close_timeout_ms", function()
    -- The peer says bye and ends its output (socat half-closes, and keeps
    -- reading for 30 s); the client reads the bye and the FIN and keeps its
    -- own side open.
    local peer = H.start_peer("printf bye", nil, "-t 30")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, peer.port):gsub('upstream = "back",',
      'upstream = "back", half_close_timeout_ms = 300,')))
    local c = H.connect(port)
    assert.are.equal("bye", c.recv(3, 10))
    assert.are.equal("", c.recv(1, 10))   -- the FIN sluice passed on
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("closed: half_close_timeout", 1, true)
    end, 10), H.read(p.log))
    c.close()
    H.stop_sluice(p)
  end)

  it("with half_close = false, ends the connection at the upstream's FIN", function()
    -- The same peer as above (bye, then its output ends, and it keeps
    -- reading for 30 s); the client keeps its side open, yet the FIN ends
    -- both connections, with no timeout involved.
    local peer = H.start_peer("printf bye", nil, "-t 30")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, peer.port):gsub('upstream = "back",',
      'upstream = "back", half_close = false, idle_timeout_ms = 600000,')))
    local c = H.connect(port)
    assert.are.equal("bye", c.recv(3, 10))
    assert.are.equal("", c.recv(1, 10))
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("on front closed: peer closed", 1, true)
    end, 10), H.read(p.log))
    c.close()
    local log = H.stop_sluice(p)
    assert.matches("upstream 127%.0%.0%.1:%d+ for front closed: eof %(in 3 B, out 0 B", log)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed %(in 0 B, out 3 B", log)
  end)

  it("with half_close = false, ends the connection at the client's FIN once its bytes are delivered",
    function()
      -- The peer stores what it reads and never answers: with a half-close
      -- the client would wait for it; here the client's FIN closes both
      -- sides once "hello" reached the peer.
      local got = H.tmpfile("got.txt")
      local peer = H.start_peer("cat > " .. H.shq(got) .. "; sleep 30")
      peers[#peers + 1] = peer
      local port = H.free_port()
      local p = H.start_sluice((proxy_config(port, peer.port, '{ "examples.stages.log_chunks" }')
        :gsub('upstream = "back",', 'upstream = "back", half_close = false,')))
      local c = H.connect(port)
      c.send("hello\n")
      c.shutdown()
      -- The end of input (a half-close would leave the client waiting for
      -- the peer, which answers nothing for 30 s).
      assert.are.equal("", c.recv(1, 10))
      c.close()
      assert.is_truthy(H.wait_for(function() return H.read(got) == "hello\n" end, 10))
      local log = H.stop_sluice(p)
      assert.matches("client 127%.0%.0%.1:%d+ on front closed: eof %(in 6 B, out 0 B", log)
      assert.matches("upstream 127%.0%.0%.1:%d+ for front closed: peer closed %(in 0 B, out 6 B", log)
    end)

  -- Reads from c slowly, up to limit bytes or the end of input, sending a
  -- line after every 256 KiB (so that the connection's input is never
  -- quiet while it closes). Returns what arrived.
  local function read_chatting(c, limit)
    local parts, got = {}, 0
    while got < limit do
      local part = c.recv(256 * 1024, 60)
      if part == nil or part == "" then break end
      parts[#parts + 1] = part
      got = got + #part
      -- (After sluice's close a write may fail: that is not what is checked.)
      if got < limit - 256 * 1024 then pcall(c.send, "more\n") end
      H.sleep(0.01)   -- a slow reader: sluice's socket holds unsent bytes when the pair ends
    end
    return table.concat(parts)
  end

  it("with half_close = false, delivers 16 MiB the upstream sent before its FIN to a client that "
     .. "keeps sending", function()
    -- nginx answers a GET with Connection: close with 16 MiB, ends its
    -- output and keeps reading (its lingering close). The client sends a
    -- line after every 256 KiB it reads: what arrives after the FIN is
    -- dropped, and must not turn the close into a reset that loses the end
    -- of the 16 MiB.
    local root = H.tmpfile("www")
    H.sh(("mkdir -p %s && head -c %d /dev/urandom > %s/big.bin"):format(H.shq(root),
                                                                     16 * 1024 * 1024, H.shq(root)))
    local nport = H.free_port()
    local conf = H.tmpfile("nginx.conf", ([[
daemon off;
master_process off;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log warn;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path %s/body;
  server { listen 127.0.0.1:%d; location / { root %s; } }
}
]]):format(root, root, root, nport, root))
    local nginx = H.spawn(("nginx -p %s -c %s"):format(H.shq(root), H.shq(conf)), "nginx")
    peers[#peers + 1] = nginx
    assert(H.wait_for(function() return H.port_open(nport) end, 10), H.read(nginx.log))
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, nport):gsub('upstream = "back",',
      'upstream = "back", half_close = false,')))
    local c = H.connect(port)
    c.send("GET /big.bin HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n")
    local got = read_chatting(c, 16 * 1024 * 1024 + 512)
    c.close()
    local body = got:match("\r\n\r\n(.*)$") or ""
    assert.are.equal(16 * 1024 * 1024, #body)
    assert.are.equal(digest(root .. "/big.bin"), digest(H.tmpfile("got.bin", body)))
    local log = H.stop_sluice(p)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed %(in %d+ B, out %d+ B",
                   log)
    assert.not_matches("reset", log, 1, true)
  end)

  it("with half_close = false, delivers a 16 MiB upload before the client's FIN to an upstream that "
     .. "answers as it reads", function()
    -- The upstream echoes what it stores: its answers keep coming after the
    -- client's FIN, which ends the pair; they are dropped, and the upload
    -- still arrives whole. sluice closes its side once the upstream's kernel
    -- has every byte; with the upstream's answers unread, that close is a
    -- reset, and socat, whose next write then fails, would quit with the
    -- last bytes unread in its socket (-s: it carries on, as a server that
    -- reads its input to the end does).
    local stored = H.tmpfile("stored.bin")
    local peer = H.start_peer("tee " .. H.shq(stored), nil, "-s -t 30")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, peer.port):gsub('upstream = "back",',
      'upstream = "back", half_close = false,')))
    local input = H.tmpfile("upload.bin")
    H.sh(("head -c %d /dev/urandom > %s"):format(16 * 1024 * 1024, H.shq(input)))
    local _, rc = H.exchange(port, { file = input }, 60)
    assert.are.equal(0, rc)
    assert.is_truthy(H.wait_for(function()
      return #H.read(stored) == 16 * 1024 * 1024
    end, 30), tostring(#H.read(stored)))
    assert.are.equal(digest(input), digest(stored))
    local log = H.stop_sluice(p)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: eof %(in 16777216 B", log)
    assert.not_matches("reset", log, 1, true)
  end)

  it("turns TCP keepalive on for both sockets of a connection with tcp_keepalive", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, plain = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back",
      tcp_keepalive = { idle_ms = 45000, interval_ms = 5000, count = 4 } },
    { name = "plain", listen = "127.0.0.1:%d", upstream = "back" },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, plain, echo.port))
    local function timers(filter)
      return H.sh(("ss -tnoH state established '%s'"):format(filter))
    end
    local c = H.connect(port)
    c.send("x")
    assert.are.equal("x", c.recv(1, 10))
    -- The client's socket on sluice's side, and sluice's to the upstream:
    -- a keepalive timer in seconds (the system's default idle is hours).
    assert.matches("timer:%(keepalive,%d+sec,0%)", timers(("sport = :%d"):format(port)))
    assert.matches("timer:%(keepalive,%d+sec,0%)", timers(("dport = :%d"):format(echo.port)))
    c.close()
    local d = H.connect(plain)
    d.send("y")
    assert.are.equal("y", d.recv(1, 10))
    assert.not_matches("keepalive", timers(("sport = :%d"):format(plain)))
    d.close()
    H.stop_sluice(p)
  end)

  it("closes the client with a logged reason when the upstream refuses", function()
    local dead = H.free_port()
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, dead))
    local out, rc = H.exchange(port, "hello\n", 5)
    assert.are.equal(0, rc)
    assert.are.equal("", out)
    local log = H.stop_sluice(p)
    assert.matches("upstream 127.0.0.1:" .. dead .. " for front closed: connect failed: Connection refused",
                   log, 1, true)
    assert.matches("client 127.0.0.1:%d+ on front: upstream back unavailable after 1 try: 127.0.0.1:"
                   .. dead .. " %(Connection refused%)", log)
    assert.matches("client 127.0.0.1:%d+ on front closed: upstream_unavailable", log)
  end)

  it("gives up on an upstream that does not answer at its connect timeout", function()
    local hole, close_hole = H.blackhole()
    local port = H.free_port()
    local p = H.start_sluice((proxy_config(port, hole):gsub("connect_timeout_ms = 2000",
                                                             "connect_timeout_ms = 300")))
    local out, rc = H.exchange(port, "hello\n", 10)
    close_hole()
    assert.are.equal(0, rc)
    assert.are.equal("", out)
    local log = H.stop_sluice(p)
    assert.matches("upstream 127.0.0.1:" .. hole .. " for front closed: connect failed: timed out", log, 1, true)
  end)

  it("uses the listener's connect timeout over the upstream's", function()
    local hole, close_hole = H.blackhole()
    local port = H.free_port()
    -- The upstream would wait 60 s; the listener says 300 ms.
    local cfg = proxy_config(port, hole):gsub("connect_timeout_ms = 2000", "connect_timeout_ms = 60000")
      :gsub('pipeline = {}', 'pipeline = {}, connect_timeout_ms = 300')
    local p = H.start_sluice(cfg)
    local out, rc = H.exchange(port, "hello\n", 20)
    close_hole()
    assert.are.equal(0, rc)
    assert.are.equal("", out)
    local log = H.stop_sluice(p)
    assert.matches("upstream 127.0.0.1:" .. hole .. " for front closed: connect failed: timed out", log, 1, true)
  end)

  -- What sluice held for the slow upstream stays near the high water mark
  -- (1 MiB) instead of growing toward the 32 MiB sent: past it by at most
  -- one 64 KiB read and the entries' overhead without Lua stages, and by at
  -- most one burst of 16 reads (queued for Lua before the bridge sees the
  -- mark) with them.
  for _, v in ipairs({
    { pipeline = "{}", over = 2 * 65536 },
    { pipeline = '{ "spec.fixtures.config.stages.pass" }', over = 17 * 65536 },
  }) do
    it("stops reading from the client while the upstream's queue is over its high mark, pipeline "
       .. v.pipeline, function()
      local sink = H.tmpfile("sink.bin")
      -- The upstream reads nothing for a second, then everything.
      local peer = H.start_peer("sleep 1; cat > " .. H.shq(sink) .. "; echo stored")
      peers[#peers + 1] = peer
      local port = H.free_port()
      local p = H.start_sluice(proxy_config(port, peer.port, v.pipeline), "SLUICE_LOG_LEVEL=debug")
      local input = H.tmpfile("big.bin")
      H.sh(("head -c %d /dev/urandom > %s"):format(32 * 1024 * 1024, H.shq(input)))
      local out, rc = H.exchange(port, { file = input }, 60)
      assert.are.equal(0, rc)
      assert.are.equal("stored\n", out)
      assert.are.equal(digest(input), digest(sink))
      local log = H.stop_sluice(p)
      assert.matches("upstream [^\n]*: paused reading from client", log)
      assert.matches("upstream [^\n]*: resumed reading from client", log)
      local peak = tonumber(log:match("upstream [^\n]* closed: [^\n]*peak queue (%d+) B"))
      assert.is_true(peak ~= nil and peak < 1024 * 1024 + v.over, "peak queue " .. tostring(peak))
    end)
  end

  it("serves the quickstart: hello through a Lua stage to the built-in echo", function()
    local text = H.read(H.root .. "/examples/quickstart.lua")
    local front, echo = H.free_port(), H.free_port()
    text = text:gsub("%f[%d]700[01]%f[%D]", { ["7000"] = tostring(front), ["7001"] = tostring(echo) })
    local p = H.start_sluice(text)
    local out, rc = H.exchange(front, "hello\n", 10)
    assert.are.equal(0, rc)
    assert.are.equal("hello\n", out)
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function() return H.read(p.log):find("reloaded from", 1, true) end, 10))
    local log = H.stop_sluice(p)
    assert.matches("chunk of 6 bytes", log)
    -- The README's tour and operations.md's session show these lines: each is
    -- one this run logged, but for the time, the clients' ports, the
    -- durations, the config's path and the counts that depend on the worker.
    local ports = { [tostring(front)] = "7000", [tostring(echo)] = "7001" }
    local function normalize(line)
      line = line:gsub("^%d%d%d%d%-%S+ ", ""):gsub("client 127%.0%.0%.1:%d+", "client 127.0.0.1:*")
      line = line:gsub("%d+ ms%)", "* ms)"):gsub("%d+ allocated in all", "* allocated in all")
      line = line:gsub("started with %d+ workers", "started with * workers")
      line = line:gsub("%(config [^)]*%)", "(config *)"):gsub("(reload[a-z]*) [^:]*%.lua", "%1 *")
      return (line:gsub(":(%d+)%f[%D]", function(port) return ":" .. (ports[port] or port) end))
    end
    local logged = {}
    for line in log:gmatch("[^\n]+") do logged[normalize(line)] = true end
    local shown = {
      README = H.read(H.root .. "/README.md"):match("and sluice logs the chunk.-```\n(.-)```"),
      operations = H.read(H.root .. "/docs/operations.md")
                     :match("A whole session with `examples/quickstart.lua`.-```\n(.-)```"),
    }
    for doc, lines in pairs(shown) do
      for line in lines:gmatch("[^\n]+") do
        assert.is_true(logged[normalize(line)], doc .. " line not logged: " .. line .. "\n" .. log)
      end
    end
  end)

  it("contains a Lua error to its connection: logged with a traceback, others carry on", function()
    local stage = H.tmpfile("boom_stage.lua", [[
return {
  channel_read = function(ctx, buf)
    if buf:tostring():find("boom", 1, true) then error("boom requested") end
    ctx:fire_read(buf)
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, echo.port, ("{ %q }"):format(mod)))
    -- A connection open across the failure of another one.
    local held = H.connect(port)
    held.send("before\n")
    assert.are.equal("before\n", held.recv(7, 10))
    local out1 = H.exchange(port, "boom\n", 5)
    assert.are.equal("", out1)
    held.send("after\n")
    assert.are.equal("after\n", held.recv(6, 10))
    held.close()
    local out2, rc2 = H.exchange(port, "fine\n", 5)
    assert.are.equal(0, rc2)
    assert.are.equal("fine\n", out2)
    local log = H.stop_sluice(p)
    assert.matches("boom requested", log, 1, true)
    assert.matches("stack traceback", log, 1, true)
    assert.matches("closed: stage " .. mod .. " failed", log, 1, true)
  end)

  it("calls a failed stage again only for its connection's end, and counts one error", function()
    -- The stage raises when its connection stops being writable; the close
    -- that follows releases the queue, which makes it writable again: that
    -- change is not delivered to it, its channel_inactive is (and raises
    -- too: logged, not counted).
    local stage = H.tmpfile("fails_twice.lua", [[
return {
  channel_writability_changed = function(ctx, w) error("writability " .. tostring(w)) end,
  channel_inactive = function(ctx) error("cleanup broke") end,
}
]]):match("([^/]+)%.lua$")
    -- After it: 2 MiB queued at once, over the high water mark.
    local flood = H.tmpfile("flood.lua", [[
local block = string.rep("x", 256 * 1024)
return { channel_read = function(ctx, buf)
  buf:release()
  for _ = 1, 8 do ctx:write(block, false) end
  ctx:flush()
end }
]]):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1, admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "w", listen = "127.0.0.1:%d", pipeline = { %q, %q } } },
}
]]):format(admin, port, stage, flood))
    for _ = 1, 3 do
      local c = H.connect(port)
      c.send("go")
      c.recv(1, 10)
      c.close()
    end
    assert.is_truthy(H.wait_for(function()
      local _, n = H.read(p.log):gsub("raised in channel_inactive", "")
      return n == 3
    end, 10), H.read(p.log))
    assert.are.equal(3, H.metric(admin, "sluice_stage_errors_total", ('stage="%s"'):format(stage)))
    local log = H.stop_sluice(p)
    local _, raised = log:gsub("raised in channel_writability_changed[^\n]*writability false", "")
    assert.are.equal(3, raised, log)
    assert.not_matches("writability true", log, 1, true)
    local _, closed = log:gsub("closed: stage " .. stage .. " failed: [^\n]*writability false", "")
    assert.are.equal(3, closed, log)
  end)

  -- A stage may refuse a connection as it is added (a deny list) or fail
  -- there: that connection closes before it is active, the process serves on.
  local refusals = {
    { "closes it", [[ctx:close("denied")]], "closed: denied" },
    { "raises", [[error("no route")]], "failed: .*no route" },
    { "fires an error", [[ctx:fire_error("refused early")]], "closed: " },
  }
  for _, r in ipairs(refusals) do
    it("closes a connection whose stage " .. r[1] .. " in added, and serves the next", function()
      local stage = H.tmpfile("added_stage.lua", ([[
local n = 0
return {
  added = function(ctx)
    n = n + 1
    if n %% 2 == 1 then %s end
  end,
}
]]):format(r[2]))
      local mod = stage:match("([^/]+)%.lua$")
      local echo = H.start_echo()
      peers[#peers + 1] = echo
      local port = H.free_port()
      local cfg = proxy_config(port, echo.port, ("{ %q }"):format(mod))
      local p = H.start_sluice((cfg:gsub("return {", "return { workers = 1,", 1)))
      -- One worker: its stage refuses the 1st, 3rd, ... connection.
      local served, refused = 0, 0
      for i = 1, 4 do
        local out, rc = H.exchange(port, "hello " .. i .. "\n", 5)
        if i % 2 == 1 then
          assert.are.equal("", out)
          refused = refused + 1
        else
          assert.are.equal(0, rc)
          assert.are.equal("hello " .. i .. "\n", out)
          served = served + 1
        end
      end
      assert.are.same({ 2, 2 }, { served, refused })
      local log = H.stop_sluice(p)
      assert.matches(r[3], log)
    end)
  end

  it("reports a buffer a stage dropped without releasing, and reclaims its memory", function()
    local stage = H.tmpfile("dropper.lua", [[
local kept = {}
return {
  channel_read = function(ctx, buf)
    if buf:tostring():find("drop", 1, true) then
      kept[#kept + 1] = buf          -- neither passed on nor released
      ctx:write("dropped\n")
      ctx:flush()
      return
    end
    ctx:fire_read(buf)
  end,
  channel_inactive = function(ctx)
    kept = {}                        -- the handles become garbage here
    collectgarbage()
    ctx:fire_inactive()
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, echo.port, ("{ %q }"):format(mod)))
    local out = H.exchange(port, "drop this\n", 5)
    assert.are.equal("dropped\n", out)
    local log = H.stop_sluice(p, { leaks_expected = true })
    assert.matches("LEAK: buffer of %d+ bytes was not released before its Lua handle was " ..
                   "garbage%-collected %(refcnt 1%); its memory was reclaimed", log)
    -- stop_sluice has checked the pool is back to zero.
  end)

  it("closes both sides with a logged reason when the upstream resets", function()
    local up = H.raw_listener()
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, up.port))
    -- The client stays connected (sleep keeps socat's input open).
    local client = H.spawn(("socat -t 0.5 SYSTEM:'printf hello; sleep 10' TCP:127.0.0.1:%d")
      :format(port), "client")
    local conn = up.accept(10)
    assert.is_not_nil(conn)
    assert.are.equal("hello", up.read(conn, 10))
    up.reset(conn)
    up.close()
    -- socat exits once sluice closes the client side.
    local closed = H.wait_for(function()
      return H.read(p.log):find("on front closed: peer closed: reset", 1, true)
    end, 10)
    local log = H.stop_sluice(p)
    H.stop(client, "KILL")
    assert.is_truthy(closed, log)
    assert.matches("upstream 127.0.0.1:" .. up.port .. " for front closed: reset (Connection reset by peer)",
                   log, 1, true)
  end)

  it("passes on what the upstream sent before its reset, when sluice reads both at once", function()
    local up = H.raw_listener()
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, up.port))
    local c = H.connect(port)
    c.send("ask")
    local conn = up.accept(10)
    assert.is_not_nil(conn)
    assert.are.equal("ask", up.read(conn, 10))
    -- sluice stopped meanwhile: the answer and the reset wait in its socket
    -- together, and its first read finds both.
    H.sh("kill -STOP " .. p.pid)
    local ffi = require("ffi")
    pcall(ffi.cdef, "long send(int fd, const void *buf, unsigned long n, int flags);")
    assert(ffi.C.send(conn, "answer", 6, 0x4000) == 6)   -- MSG_NOSIGNAL
    up.reset(conn)
    up.close()
    H.sh("kill -CONT " .. p.pid)
    assert.are.equal("answer", c.recv(6, 10))
    assert.are.equal("", c.recv(1, 10))
    c.close()
    local log = H.stop_sluice(p)
    assert.matches("upstream 127.0.0.1:" .. up.port .. " for front closed: reset (Connection reset by peer)",
                   log, 1, true)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed: reset [^\n]*out 6 B", log)
  end)

  it("pauses reading at allocator.max_memory and carries on: nothing is lost", function()
    local sink = H.tmpfile("sink.bin")
    -- A slow upstream: what the client sends piles up in sluice first.
    local peer = H.start_peer("sleep 1; cat > " .. H.shq(sink) .. "; echo stored")
    peers[#peers + 1] = peer
    local port = H.free_port()
    -- Two 64 KiB chunks in all, far below the 1 MiB high water mark: the
    -- ceiling, not backpressure, is what stops the reads.
    local cfg = proxy_config(port, peer.port)
      :gsub("^return {", [[return {
  workers = 1,
  allocator = { page_size = 4096, chunk_size = 65536, max_memory = 131072 },]])
      :gsub('upstream = "back",',
            -- Buffers, not pipes: splicing would carry the bytes past the pool.
            'upstream = "back", low_water_mark = 524288, high_water_mark = 1048576, splice = false,')
    local p = H.start_sluice(cfg)
    local input = H.tmpfile("pressure.bin")
    -- More than the kernel's socket buffers can absorb while the upstream
    -- sleeps (tcp_wmem's maximum is 4 MiB here): sluice must hold the rest.
    H.sh(("head -c %d /dev/urandom > %s"):format(8 * 1024 * 1024, H.shq(input)))
    local out, rc = H.exchange(port, { file = input }, 60)
    assert.are.equal(0, rc)
    assert.are.equal("stored\n", out)
    assert.are.equal(digest(input), digest(sink))
    local log = H.stop_sluice(p)
    -- Each pause is said once, however many 50 ms retries it takes, and
    -- its end is said too.
    local paused, resumed = 0, 0
    for _ in log:gmatch("no buffer memory, reading paused") do paused = paused + 1 end
    for _ in log:gmatch("buffer memory again, reading resumed after %d+ retries") do
      resumed = resumed + 1
    end
    assert.is_true(paused >= 1, log)
    assert.are.equal(paused, resumed, log)
    assert.not_matches("closed: [^\n]*memory", log)
  end)

  it("contains a stage that releases a buffer it passed on: an error, not a double free", function()
    local stage = H.tmpfile("overrelease.lua", [[
return {
  channel_read = function(ctx, buf)
    ctx:fire_read(buf)
    buf:release()       -- wrong: the reference went with fire_read
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    local peer = H.start_peer("cat > /dev/null")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, peer.port, ("{ %q }"):format(mod)))
    H.exchange(port, "one\n", 5)
    H.exchange(port, "two\n", 5)
    local log = H.stop_sluice(p)  -- exit 0, pool clean: nothing was freed twice
    assert.matches("release of a reference this handle does not own", log, 1, true)
    assert.matches("closed: stage " .. mod .. " failed", log, 1, true)
  end)

  it("gives memory back to the OS once idle for allocator.trim_idle_ms", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port = H.free_port()
    local cfg = proxy_config(port, echo.port)
      :gsub("^return {", "return {\n  allocator = { trim_idle_ms = 200 },")
    local p = H.start_sluice(cfg)
    local input = H.tmpfile("idle.bin")
    H.sh(("head -c %d /dev/urandom > %s"):format(4 * 1024 * 1024, H.shq(input)))
    local _, rc = H.exchange(port, { file = input }, 30)
    assert.are.equal(0, rc)
    local line = H.wait_for(function()
      return H.read(p.log):match("pool idle: gave back [^\n]* 0 bytes mapped now")
    end, 10)
    local log = H.stop_sluice(p)
    assert.is_truthy(line, log)
    assert.matches("pool idle: gave back %d+ cached blocks, [1-9]%d* chunks", log)
  end)

  for _, level in ipairs({ "simple", "advanced" }) do
    it("names where a buffer was released when a dead handle is used (" .. level .. ")", function()
      local stage = H.tmpfile("lateuse.lua", [[
return {
  channel_read = function(ctx, buf)
    local copy = buf:tostring()
    buf:release()
    ctx:write(copy)
    ctx:flush()
    return #buf          -- wrong: used after its release
  end,
}
]])
      local mod = stage:match("([^/]+)%.lua$")
      local peer = H.start_peer("cat > /dev/null")
      peers[#peers + 1] = peer
      local port = H.free_port()
      local p = H.start_sluice(proxy_config(port, peer.port, ("{ %q }"):format(mod)),
                               "SLUICE_LEAK_DETECTION=" .. level)
      H.exchange(port, "x", 5)
      local log = H.stop_sluice(p)
      local site = level == "advanced" and ("stage " .. mod .. " at [^)]*" .. mod .. "%.lua:4") or mod
      assert.matches("buffer used after release %(refcnt 0, released by " .. site .. "%)", log)
    end)
  end

  it("delivers several events from one Lua stage to the next Lua stage in order", function()
    local split = H.tmpfile("splitter.lua", [[
local sluice = require("sluice")
return {
  channel_read = function(ctx, buf)
    local s = buf:tostring()
    buf:release()
    for i = 1, #s do ctx:fire_read(sluice.buf.from(s:sub(i, i))) end
  end,
}
]])
    local wrap = H.tmpfile("bracket.lua", [[
return {
  channel_read = function(ctx, buf)
    local s = buf:tostring()
    buf:release()
    ctx:write("[" .. s .. "]")
    ctx:flush()
  end,
}
]])
    local m1, m2 = split:match("([^/]+)%.lua$"), wrap:match("([^/]+)%.lua$")
    local port = H.free_port()
    local p = H.start_sluice(([[
return { listeners = { { name = "front", listen = "127.0.0.1:%d", pipeline = { %q, %q } } } }
]]):format(port, m1, m2))
    local out = H.exchange(port, "abc", 5)
    assert.are.equal("[a][b][c]", out)
    H.stop_sluice(p)
  end)

  local function two_stage_proxy(first_src)
    local first = H.tmpfile("first.lua", first_src)
    local echo_stage = H.tmpfile("writer.lua", [[
return {
  channel_read = function(ctx, buf)
    ctx:write(buf)      -- the reference goes on to the connection
    ctx:flush()
  end,
}
]])
    local m1, m2 = first:match("([^/]+)%.lua$"), echo_stage:match("([^/]+)%.lua$")
    local port = H.free_port()
    local p = H.start_sluice(([[
return { listeners = { { name = "front", listen = "127.0.0.1:%d", pipeline = { %q, %q } } } }
]]):format(port, m1, m2))
    return p, port, m1, m2
  end

  it("catches a release after passing a buffer to the next Lua stage, where it happens", function()
    local p, port, m1 = two_stage_proxy([[
return {
  channel_read = function(ctx, buf)
    ctx:fire_read(buf)
    buf:release()       -- wrong: the next stage owns it now
  end,
}
]])
    H.exchange(port, "x", 5)
    local log = H.stop_sluice(p)  -- pool clean: the buffer was released once
    -- The mistake is reported in the stage that made it, not in the next one.
    assert.matches("stage " .. m1 .. " raised in channel_read", log, 1, true)
    assert.matches("release of a reference this handle does not own", log, 1, true)
    assert.not_matches("buffer used after release", log, 1, true)
  end)

  it("does not release what a failing stage had already passed to the next Lua stage", function()
    local p, port, m1 = two_stage_proxy([[
return {
  channel_read = function(ctx, buf)
    ctx:fire_read(buf)
    error("after passing it on")
  end,
}
]])
    H.exchange(port, "x", 5)
    local log = H.stop_sluice(p)  -- pool clean: released exactly once, by the connection
    assert.matches("stage " .. m1 .. " raised in channel_read", log, 1, true)
    assert.not_matches("buffer used after release", log, 1, true)
  end)

  it("does not hand the rest of a read burst to a failed stage behind another Lua stage", function()
    -- The second stage fails on a read that filled its buffer, so the read
    -- loop goes on and more reads of the same wake-up are queued for the
    -- first stage, which passes them on: the failed stage must not get
    -- them (nor fail again for each).
    local m1 = H.tmpfile("passing.lua", [[
return { channel_read = function(ctx, buf) ctx:fire_read(buf) end }
]]):match("([^/]+)%.lua$")
    local m2 = H.tmpfile("failing.lua", [[
return {
  channel_read = function(ctx, buf)
    -- From a full read on, every read raises.
    if buf:writable_bytes() == 0 then ctx.state.full = true end
    if ctx.state.full then error("a full read") end
    ctx:fire_read(buf)
  end,
}
]]):match("([^/]+)%.lua$")
    local port = H.free_port()
    local p = H.start_sluice(([[
return { listeners = { { name = "front", listen = "127.0.0.1:%d",
                         pipeline = { %q, %q, "sluice.stages.echo" } } } }
]]):format(port, m1, m2))
    local input = H.tmpfile("burst.bin")
    H.sh(("head -c %d /dev/zero > %s"):format(4 * 1024 * 1024, H.shq(input)))
    H.exchange(port, { file = input }, 10)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("closed: stage " .. m2 .. " failed", 1, true)
    end, 10))
    local log = H.stop_sluice(p)
    local _, raised = log:gsub("stage " .. m2 .. " raised in channel_read", "")
    assert.are.equal(1, raised, log)
  end)

  it("tells a Lua stage when its connection stops and starts being writable", function()
    local stage = H.tmpfile("watch.lua", [[
local log = require("sluice.log")
return {
  channel_writability_changed = function(ctx, writable)
    log.info("writability: %s", tostring(writable))
    ctx:fire_writability_changed(writable)
  end,
}
]])
    local mod = stage:match("([^/]+)%.lua$")
    -- The upstream sends 8 MiB at once; the client reads only after a second.
    -- (-t 30: the peer keeps its socket until sluice has read everything,
    -- however long the slow client holds sluice's reads back.)
    local peer = H.start_peer("head -c 8388608 /dev/zero", nil, "-t 30")
    peers[#peers + 1] = peer
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, peer.port, ("{ %q }"):format(mod)))
    local out = H.tmpfile("slow.out")
    local _, rc = H.sh(("timeout 30 socat -u TCP:127.0.0.1:%d SYSTEM:'sleep 1; cat > %s'")
      :format(port, out))
    assert.are.equal(0, rc)
    assert.are.equal(8388608, #H.read(out))
    local log = H.stop_sluice(p)
    assert.matches("writability: false", log, 1, true)
    assert.matches("writability: true", log, 1, true)
  end)
end)
