-- Kernel splicing on pass-through listeners, through the real binary with
-- real peers (socat) on loopback: bytes intact and in order, every byte
-- counted, the peer's FIN after the last spliced byte, a slow reader, a
-- peer that goes away mid-transfer, and the listeners that must not splice.
local H = require("helpers")

local MiB = 1024 * 1024

-- extra: more listener keys; splice = true unless extra sets splice
-- (every peer here is on loopback, where the default "auto" does not
-- splice). top: more top-level keys ("max_pipes = 1"), or nil.
local function config(port, admin_port, upstream_port, extra, log_level, top)
  if not (extra or ""):find("splice", 1, true) then extra = "splice = true, " .. (extra or "") end
  return ([[
return {
  %sworkers = 1,
  log_level = "%s",
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", %s },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" }, connect_timeout_ms = 2000 } },
  admin = { listen = "127.0.0.1:%d" },
}
]]):format(top and top .. ",\n  " or "", log_level or "info", port, extra or "",
                upstream_port, admin_port)
end

-- A client that sends the file input and writes what comes back to out.
local function upload(port, input, out, name)
  return H.spawn(("sh -c %s"):format(H.shq(("socat -t 30 - TCP:127.0.0.1:%d < %s > %s")
    :format(port, H.shq(input), H.shq(out)))), name or "client")
end

local function digest(path)
  return (H.sh("sha256sum < " .. H.shq(path))):match("^(%x+)")
end

local function random_file(name, bytes)
  local path = H.tmpfile(name)
  H.sh(("head -c %d /dev/urandom > %s"):format(bytes, H.shq(path)))
  return path
end

describe("splicing", function()
  local peers = H.killed_after_each()

  -- Runs one exchange of `bytes` random bytes with an echo peer and returns
  -- the spliced and sent byte counts from /metrics.
  local function echo_run(extra, bytes, top)
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port, extra, nil, top))
    local input = random_file("in.bin", bytes)
    local _, rc, out = H.exchange(port, { file = input }, 60)
    assert.are.equal(0, rc)
    assert.are.equal(bytes, #H.read(out))
    assert.are.equal(digest(input), digest(out))
    -- The access log line is written at close: wait for it, then read.
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_total", 'listener="front"') == 1 and
             H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10))
    local m = {
      spliced = H.metric(admin, "sluice_spliced_bytes_total", 'worker="0"'),
      pipes = H.metric(admin, "sluice_splice_pipes", 'worker="0"'),
      sent = H.metric(admin, "sluice_sent_bytes_total", 'listener="front"'),
      received = H.metric(admin, "sluice_received_bytes_total", 'listener="front"'),
    }
    m.log = H.stop_sluice(p)
    return m
  end

  it("moves a bulk echo exchange through pipes, intact, counting every byte", function()
    local m = echo_run(nil, 32 * MiB)
    -- Both ways together sent 64 MiB; most of it went through a pipe: all
    -- but the reads before they grow to the largest size, and those after
    -- a wake-up that moved less than 4 KiB (back to buffers until the reads
    -- grow again), which depend on timing: a quarter is a floor a loaded
    -- machine keeps (47 MB of the 64 seen on one).
    assert.is_true(m.spliced > 16 * MiB and m.spliced <= 64 * MiB, tostring(m.spliced))
    assert.are.equal(32 * MiB, m.received)
    assert.are.equal(32 * MiB, m.sent)
    -- The pipes went back to the worker's pool, empty, for the next ones.
    assert.is_true(m.pipes >= 1 and m.pipes <= 2, tostring(m.pipes))
    assert.matches(("closed: eof %%(in %d B, out %d B"):format(32 * MiB, 32 * MiB), m.log)
  end)

  it("with half_close = false, ends both connections at the upstream's FIN after the last spliced byte",
    function()
      -- The peer sends 16 MiB and ends its output, and keeps reading; the
      -- client keeps its own side open: the FIN alone ends the pair.
      local sent = H.tmpfile("sent.bin")
      local peer = H.start_peer(("head -c %d /dev/urandom | tee %s"):format(16 * MiB, H.shq(sent)),
                                nil, "-t 30")
      peers[#peers + 1] = peer
      local port, admin = H.free_port(), H.free_port()
      local p = H.start_sluice(config(port, admin, peer.port, "half_close = false"))
      local c = H.connect(port)
      local got = c.recv(16 * MiB + 1, 60)   -- everything, then the end of input
      assert.are.equal(16 * MiB, #got)
      assert.are.equal(digest(sent), digest(H.tmpfile("got.bin", got)))
      assert.is_truthy(H.wait_for(function()
        return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
      end, 10))
      local spliced = H.metric(admin, "sluice_spliced_bytes_total", 'worker="0"')
      c.close()
      local log = H.stop_sluice(p)
      assert.is_true(spliced > 0 and spliced <= 16 * MiB, tostring(spliced))
      assert.matches("upstream 127%.0%.0%.1:%d+ for front closed: eof %(in 16777216 B", log)
      assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed %(in 0 B, out 16777216 B",
                     log)
    end)

  it("does not splice with splice = false", function()
    local m = echo_run("splice = false", 8 * MiB)
    assert.are.equal(0, m.spliced)
    assert.are.equal(0, m.pipes)
    assert.are.equal(8 * MiB, m.sent)
  end)

  it('does not splice into loopback peers with splice = "auto", the default', function()
    for _, extra in ipairs({ 'splice = "auto"', "--[[ no splice key ]]" }) do
      local m = echo_run(extra, 8 * MiB)
      assert.are.equal(0, m.spliced, extra)
      assert.are.equal(0, m.pipes, extra)
      assert.are.equal(8 * MiB, m.sent, extra)
    end
  end)

  -- Sends the file input through front, checks that what comes back is
  -- the file expect (input when nil), waits for the connection's end and
  -- returns the bytes spliced.
  local function exchange_spliced(port, admin, input, expect)
    local _, rc, out = H.exchange(port, { file = input }, 60)
    assert.are.equal(0, rc)
    assert.are.equal(digest(expect or input), digest(out))
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10))
    return H.metric(admin, "sluice_spliced_bytes_total", 'worker="0"')
  end

  it('judges "auto" by the socket\'s peer, not the address a PROXY protocol header gave', function()
    -- The header says the client is 203.0.113.7; the socket's peer is on
    -- loopback, and it is that peer which reads what is written to it. A
    -- Lua stage takes sluice.proxy_protocol and itself out once active, so
    -- the pair is pass-through by the time its upstream connects.
    local handoff = H.tmpfile("handoff.lua", [[
return {
  channel_active = function(ctx)
    local p = ctx:pipeline()
    p:remove("sluice.proxy_protocol")
    ctx:fire_active()
    p:remove(ctx.name)
  end,
  channel_read = function(ctx, buf) ctx:fire_read(buf) end,
}
]])
    local mod = handoff:match("([^/]+)%.lua$")
    local header = "PROXY TCP4 203.0.113.7 127.0.0.1 4711 80\r\n"
    local data = random_file("pp.data", 8 * MiB)
    local input = H.tmpfile("pp.in", header)
    H.sh(("cat %s >> %s"):format(H.shq(data), H.shq(input)))
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port,
      ('splice = "auto", pipeline = { "sluice.proxy_protocol", %q }'):format(mod)))
    assert.are.equal(0, exchange_spliced(port, admin, input, data))
    local log = H.stop_sluice(p)
    assert.matches("client 203.0.113.7:4711 on front", log, 1, true)
  end)

  it('counts an address of this machine as loopback under "auto"', function()
    -- The kernel routes a connection to one of its own addresses over the
    -- loopback interface: the peer there pays for spliced bytes as on
    -- 127.0.0.1.
    local host = (H.sh("hostname -I 2>/dev/null")):match("(%d+%.%d+%.%d+%.%d+)")
    if host == nil or host:match("^127%.") then
      pending("this machine has no IPv4 address but loopback ones")
      return
    end
    local echo_port = H.free_port()
    local echo = H.spawn(("socat TCP-LISTEN:%d,bind=%s,reuseaddr,fork EXEC:cat")
      :format(echo_port, host), "echo")
    peers[#peers + 1] = echo
    assert.is_truthy(H.wait_for(function()
      local _, rc = H.sh(("socat -T1 /dev/null TCP:%s:%d,connect-timeout=1 2>/dev/null")
        :format(host, echo_port))
      return rc == 0
    end, 10))
    local port, admin = H.free_port(), H.free_port()
    local text = config(port, admin, echo_port, 'splice = "auto"')
      :gsub("127%.0%.0%.1:" .. echo_port, host .. ":" .. echo_port)
    local p = H.start_sluice(text)
    assert.are.equal(0, exchange_spliced(port, admin, random_file("own.bin", 8 * MiB)))
    H.stop_sluice(p)
  end)

  it("does not splice with max_pipes = 0", function()
    local m = echo_run(nil, 8 * MiB, "max_pipes = 0")
    assert.are.equal(0, m.spliced)
    assert.are.equal(0, m.pipes)
    assert.are.equal(8 * MiB, m.sent)
  end)

  it("opens no more pipes than max_pipes; the other connections use buffers", function()
    -- Two uploads to peers that read nothing for 2 s: each connection
    -- would hold a full pipe; with max_pipes = 1 one of them carries on
    -- with buffers, and both arrive intact.
    local peer = H.start_peer("sleep 2; sha256sum", nil, "-t 10")
    peers[#peers + 1] = peer
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, peer.port, nil, nil, "max_pipes = 1"))
    local input = random_file("two.bin", 32 * MiB)
    local clients, outs = {}, {}
    for i = 1, 2 do
      outs[i] = H.tmpfile(("two.%d.out"):format(i))
      clients[i] = upload(port, input, outs[i], "client" .. i)
    end
    -- While the peers sleep, one pipe is full and the other connection
    -- was refused one.
    local most = 0
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      local pipes, waiting = body:match("Splice pipes %(kernel memory%): pipes=(%d+) waiting=(%d+)")
      pipes, waiting = tonumber(pipes), tonumber(waiting)
      if pipes and pipes > most then most = pipes end
      return waiting and waiting > 0 and
             H.metric(admin, "sluice_splice_refused_total", 'worker="0"') >= 1
    end, 10))
    for i = 1, 2 do
      assert.are.equal(0, H.stop(clients[i], "CONT", 60))   -- waits for its end
      assert.are.equal(digest(input), H.read(outs[i]):match("^(%x+)"), H.read(p.log))
    end
    assert.are.equal(1, most)
    assert.are.equal(1, H.metric(admin, "sluice_splice_pipes", 'worker="0"'))
    H.stop_sluice(p)
  end)

  it("does not splice where a stage sees the bytes", function()
    local m = echo_run('pipeline = { "examples.stages.log_chunks" }', 8 * MiB)
    assert.are.equal(0, m.spliced)
    assert.are.equal(8 * MiB, m.sent)
  end)

  it("waits for a slow reader, and sends the client's FIN after the last spliced byte", function()
    -- The peer reads nothing for a second, so the pipe and both sockets
    -- fill up and sluice must stop reading; then it hashes everything it
    -- gets up to the FIN and answers with the hash.
    local peer = H.start_peer("sleep 1; sha256sum", nil, "-t 10")
    peers[#peers + 1] = peer
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, peer.port, nil, "debug"))
    local input = random_file("slow.bin", 48 * MiB)
    local out = H.tmpfile("slow.out")
    local client = upload(port, input, out, "client")
    -- While the peer sleeps, /memory shows the bytes waiting in the pipe.
    local waiting
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      waiting = tonumber(body:match("Splice pipes %(kernel memory%): pipes=%d+ waiting=(%d+)"))
      return waiting and waiting > 0
    end, 10), tostring(waiting))
    assert.are.equal(0, H.stop(client, "CONT", 60))   -- waits for its end
    local spliced = H.metric(admin, "sluice_spliced_bytes_total", 'worker="0"')
    local log = H.stop_sluice(p)
    assert.are.equal(digest(input), H.read(out):match("^(%x+)"), log)
    assert.is_true(spliced > 32 * MiB, tostring(spliced))
    assert.matches("upstream [^\n]*: paused reading from client [^\n]* bytes in its pipe%)", log)
    assert.matches("upstream [^\n]*: resumed reading from client [^\n]*%(its pipe is empty%)", log)
  end)

  it("hands what its pipe holds on when an idle timeout closes a paused upload", function()
    -- The upstream reads nothing for 3 s, then counts what it gets up to
    -- the FIN; the client's connection, paused with its pipe full, goes
    -- idle for 1 s and is closed: every byte sluice read from it must
    -- still reach the upstream, before the FIN.
    local count = H.tmpfile("count.txt", "")
    local peer = H.start_peer(("sleep 3; wc -c >> %s"):format(H.shq(count)), nil, "-t 10")
    peers[#peers + 1] = peer
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, peer.port, "idle_timeout_ms = 1000"))
    local input = H.tmpfile("zeros.bin")
    H.sh(("head -c %d /dev/zero > %s"):format(32 * MiB, H.shq(input)))
    local client = upload(port, input, "/dev/null")
    -- (The peer's readiness probe was a connection too: it counted 0.)
    local got
    assert.is_truthy(H.wait_for(function()
      for n in H.read(count):gmatch("%d+") do
        if tonumber(n) > 0 then got = tonumber(n) end
      end
      return got
    end, 20))
    H.stop(client, "KILL")
    local log = H.stop_sluice(p)
    local read_in = tonumber(log:match("client [^\n]* closed: idle_timeout %(in (%d+) B"))
    assert.is_truthy(read_in, log)
    assert.are.equal(read_in, got, log)
    assert.is_falsy(log:find("unsent data dropped", 1, true), log)
  end)

  it("carries a spliced transfer through a reload, and finishes it while draining", function()
    local peer = H.start_peer("sleep 1; sha256sum", nil, "-t 10")
    peers[#peers + 1] = peer
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, peer.port, nil, nil, "drain_timeout_ms = 30000"))
    local input = random_file("through.bin", 48 * MiB)
    local out = H.tmpfile("through.out")
    local client = upload(port, input, out, "client")
    -- Under way: the pipe holds bytes the sleeping peer has not taken.
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      local waiting = tonumber(body:match("pipes=%d+ waiting=(%d+)"))
      return waiting and waiting > 0
    end, 10))
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    -- SIGTERM: no new connections; this one may finish (drain_timeout_ms).
    os.execute("kill -TERM " .. p.pid)
    assert.are.equal(0, H.stop(client, "CONT", 60))   -- waits for its end
    assert.are.equal(digest(input), H.read(out):match("^(%x+)"), H.read(p.log))
    local log = H.stop_sluice(p)   -- it has stopped by itself: checks how
    assert.matches("worker 0: drained", log, 1, true)
    assert.not_matches("closed: shutdown", log)
  end)

  it("closes both sides when the peer goes away mid-transfer, and serves the next client", function()
    -- Reads 1 MiB, then exits: the rest of the transfer meets a closed socket.
    local peer = H.start_peer("head -c 1048576 > /dev/null")
    peers[#peers + 1] = peer
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, peer.port))
    local input = random_file("cut.bin", 64 * MiB)
    H.exchange(port, { file = input }, 30)
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10))
    -- The next connection is served as usual (the peer takes its few bytes).
    local _, rc = H.exchange(port, "hello", 10)
    assert.are.equal(0, rc)
    assert.are.equal(2, H.metric(admin, "sluice_connections_total", 'listener="front"'))
    local log = H.stop_sluice(p)
    assert.matches("client 127%.0%.0%.1:%d+ on front closed: peer closed", log)
    assert.is_falsy(log:find("LEAK", 1, true))
  end)
end)
