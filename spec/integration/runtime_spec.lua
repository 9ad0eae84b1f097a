-- Running sluice: workers, connection limits, idle timeouts, draining on
-- SIGTERM, reloading on SIGHUP, and the access log. The real binary, real
-- peers (socat), 127.0.0.1 only; every wait is bounded, and nothing depends
-- on how fast the machine is: clients that must stay open wait for a file
-- the spec creates.
local H = require("helpers")

local held_client = H.held_client

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

local function access_lines(path)
  local lines = {}
  for line in H.read(path):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return lines
end

describe("running sluice", function()
  local peers = H.killed_after_each()

  local function echo_peer()
    local e = H.start_echo()
    peers[#peers + 1] = e
    return e
  end

  it("serves connections on every worker, and logs each one with every field", function()
    local echo = echo_peer()
    local port = H.free_port()
    local alog = H.tmpfile("access.log")
    local p = H.start_sluice(([[
return {
  workers = 2,
  access_log = %q,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(alog, port, echo.port))
    -- 64 connections, each from a new source port: the kernel spreads them
    -- over the workers' sockets by a hash of the addresses.
    local replies = H.tmpfile("replies")
    local _, rc = H.sh(("for i in $(seq 64); do printf 'hello\\n' | timeout 10 socat -t 5 - TCP:127.0.0.1:%d; done > %s")
      :format(port, H.shq(replies)))
    assert.are.equal(0, rc)
    assert.are.equal(64, count(H.read(replies), "hello\n"))
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 64 end, 10))
    local log = H.stop_sluice(p)
    assert.matches("started with 2 workers", log, 1, true)
    local lines = access_lines(alog)
    assert.are.equal(64, #lines)
    local per_worker = {}
    for _, line in ipairs(lines) do
      local w = assert(line:match(
        "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ client=127%.0%.0%.1:%d+ listener=front "
        .. "upstream=127%.0%.0%.1:" .. echo.port .. " worker=(%d) bytes_in=6 bytes_out=6 "
        .. "duration_ms=%d+ reason=\"eof\"$"), line)
      per_worker[w] = (per_worker[w] or 0) + 1
    end
    assert.is_true((per_worker["0"] or 0) > 0, "worker 0 served none")
    assert.is_true((per_worker["1"] or 0) > 0, "worker 1 served none")
    -- Both pools were checked at exit, and no buffer went from one worker
    -- to another.
    assert.are.equal(2, count(log, "pool clean at exit %(0 buffers outstanding, %d+ allocated in all, "
                                .. "0 freed by other threads%)"))
  end)

  it("logs a stage's close reason on one line, control characters as spaces", function()
    local close_port, error_port = H.free_port(), H.free_port()
    local alog = H.tmpfile("access.log")
    local p = H.start_sluice(([[
return {
  workers = 1, access_log = %q,
  listeners = {
    { name = "c", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.close_lines", how = "close" } } },
    { name = "e", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.close_lines", how = "error" } } },
  },
}
]]):format(alog, close_port, error_port))
    assert.are.equal("", (H.exchange(close_port, "hello\n", 10)))
    assert.are.equal("", (H.exchange(error_port, "hello\n", 10)))
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 2 end, 10))
    local log = H.stop_sluice(p)
    local reason = 'said "bye" 2026-01-01T00:00:00.000Z [info] forged record  end'
    for _, listener in ipairs({ "c", "e" }) do
      assert.matches(("\n[^\n]* %%[%s%%] client 127%%.0%%.0%%.1:%%d+ on %s closed: %s %%(in 6 B, "):format(
        listener == "c" and "info" or "warn", listener, reason:gsub("%p", "%%%0")), log)
    end
    assert.not_matches("\n2026%-01%-01", log)
    local escaped = reason:gsub('"', '\\"')
    for _, line in ipairs(access_lines(alog)) do
      assert.are.equal(' reason="' .. escaped .. '"', line:match(' reason=".*$'))
    end
  end)

  it("writes JSON lines with access_log_format = \"json\", and a reload switches the format", function()
    local json = require("dkjson")
    local echo = echo_peer()
    local front, close_port, utf_port, long_port = H.free_port(), H.free_port(), H.free_port(),
                                                     H.free_port()
    local long_name = ("n"):rep(600)
    local alog = H.tmpfile("access.log")
    local function config(format)
      return ([[
return {
  workers = 1, access_log = %q, access_log_format = %q,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back" },
    { name = "c", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.close_lines", how = "close" } } },
    { name = "u", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.close_lines", how = "close",
                     reason = "caf\195\169 \233t\233 \240\159\152\128 \237\160\128" } } },
    { name = "%s", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(alog, format, front, close_port, utf_port, long_name, long_port, echo.port)
    end
    local p = H.start_sluice(config("json"))
    assert.are.equal("hello\n", (H.exchange(front, "hello\n", 10)))
    assert.are.equal("", (H.exchange(close_port, "hello\n", 10)))
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 2 end, 10))
    local lines = access_lines(alog)
    local a, b = json.decode(lines[1], 1, json.null), json.decode(lines[2], 1, json.null)
    assert.is_table(a, lines[1])
    assert.is_table(b, lines[2])
    if a.listener ~= "front" then a, b = b, a end
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", a.time)
    assert.matches("^127%.0%.0%.1:%d+$", a.client)
    assert.are.equal("front", a.listener)
    assert.are.equal("127.0.0.1:" .. echo.port, a.upstream)
    assert.are.equal(0, a.worker)
    assert.are.equal(6, a.bytes_in)
    assert.are.equal(6, a.bytes_out)
    assert.is_number(a.duration_ms)
    assert.are.equal("eof", a.reason)
    -- No upstream: null. A reason with quotes and what looked like a
    -- record comes back as the stage gave it (control characters as spaces).
    assert.are.equal("c", b.listener)
    assert.are.equal(json.null, b.upstream)
    assert.are.equal('said "bye" 2026-01-01T00:00:00.000Z [info] forged record  end', b.reason)
    -- Bytes that are not UTF-8 (Latin-1, a surrogate's encoding) become
    -- U+FFFD, valid UTF-8 stays; a name too long for the line is cut but
    -- the line stays JSON.
    assert.are.equal("", (H.exchange(utf_port, "hello\n", 10)))
    assert.are.equal("hi\n", (H.exchange(long_port, "hi\n", 10)))
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 4 end, 10))
    lines = access_lines(alog)
    local u, l = json.decode(lines[3], 1, json.null), json.decode(lines[4], 1, json.null)
    assert.is_table(u, lines[3])
    assert.is_table(l, lines[4])
    if u.listener ~= "u" then u, l = l, u end
    assert.are.equal("caf\195\169 \239\191\189t\239\191\189 \240\159\152\128 "
                     .. "\239\191\189\239\191\189\239\191\189", u.reason)
    assert.are.equal(("n"):rep(128), l.listener)
    assert.are.equal("eof", l.reason)

    local f = assert(io.open(p.config, "w"))
    f:write(config("logfmt"))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 10))
    assert.are.equal("hello\n", (H.exchange(front, "hello\n", 10)))
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 5 end, 10))
    assert.matches(" listener=front upstream=127%.0%.0%.1:%d+ worker=0 bytes_in=6 bytes_out=6 ",
                   access_lines(alog)[5])
    H.stop_sluice(p)
  end)

  it("keeps a stage's log record on one line, and a stage error's message on the line before its traceback",
    function()
    local log_port, raise_port, other = H.free_port(), H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  listeners = {
    { name = "l", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.log_lines", how = "log", port = %d } } },
    { name = "r", listen = "127.0.0.1:%d", pipeline = { { "spec.fixtures.stages.log_lines", how = "raise" } } },
    { name = "o", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
  },
}
]]):format(log_port, other, raise_port, other))
    local said = "hi\n2026-01-01T00:00:00.000Z [error] forged record\r\tend\0!"
    assert.are.equal("", (H.exchange(log_port, said, 10)))
    assert.are.equal("", (H.exchange(raise_port, said, 10)))
    local log = H.stop_sluice(p)
    -- Nothing the client sent starts a line.
    assert.not_matches("\n2026%-01%-01", log)
    local flat = "hi 2026-01-01T00:00:00.000Z [error] forged record  end !"
    assert.matches("%[warn%] client said: " .. flat:gsub("%p", "%%%0") .. "\n", log)
    -- The target was refused, not cut at its NUL and connected to "o".
    assert.matches('[info] connect with a NUL: nil, expected the name of an upstream or "host:port", '
                   .. "not a string holding a NUL byte\n", log, 1, true)
    assert.not_matches("for l closed", log)
    -- A stage error: the record (the message on its line), then its
    -- traceback. (The traceback handler reads the message up to its NUL.)
    assert.matches("%[error%] stage spec%.fixtures%.stages%.log_lines raised in channel_read on client "
                   .. "127%.0%.0%.1:%d+ on r: [^\n]*log_lines%.lua:%d+: bad input: "
                   .. flat:match("^(.-) !$"):gsub("%p", "%%%0") .. "\nstack traceback:\n\t", log)
  end)

  it("refuses to start, with nothing left running, when another process holds the port", function()
    local port = H.free_port()
    local cfg = ([[
return { workers = 2,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port)
    local first = H.start_sluice(cfg)
    -- The same configuration again: SO_REUSEPORT must not let it share the port.
    local path = H.tmpfile("second.lua", cfg)
    local out, rc = H.sh(("SLUICE_ROOT=%s %s -c %s 2>&1"):format(H.shq(H.root), H.shq(H.bin), H.shq(path)))
    assert.are.equal(1, rc)
    assert.matches("sluice: cannot start: listeners[1] (e): cannot listen on 127.0.0.1:" .. port
                   .. ": Address already in use", out, 1, true)
    assert.not_matches("started with", out, 1, true)
    -- The first one still serves.
    assert.are.equal("still\n", (H.exchange(port, "still\n", 10)))
    H.stop_sluice(first)
  end)

  it("holds accepting to max_connection_rate, all workers together, losing no connection", function()
    local port, admin = H.free_port(), H.free_port()
    local function config(rate)
      return ([[
return {
  workers = 2, admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "paced", listen = "127.0.0.1:%d", %s
                  pipeline = { "sluice.stages.echo" } } },
}
]]):format(admin, port, rate and ("max_connection_rate = %d,"):format(rate) or "")
    end
    local p = H.start_sluice(config(4))
    -- 12 clients at once: 4 (a second's worth) are accepted at once, the
    -- others wait in the kernel's queue and are accepted one per 250 ms.
    local function burst(n)
      local dir = H.tmpdir()
      local started = H.now()
      H.sh(("for i in $(seq %d); do (printf 'x' | timeout 60 socat -t 30 - TCP:127.0.0.1:%d > %s/r$i) & done; wait")
        :format(n, port, dir))
      local elapsed, answered = H.now() - started, 0
      for i = 1, n do
        if H.read(dir .. "/r" .. i) == "x" then answered = answered + 1 end
      end
      return answered, elapsed
    end
    local answered, elapsed = burst(12)
    assert.are.equal(12, answered)
    -- The limiter's own schedule, whatever the machine's speed: the last
    -- of the 8 that waited was due 2 s after the first 4.
    assert.is_true(elapsed >= 1.5, ("12 connections in %.2f s"):format(elapsed))
    local pauses = H.metric(admin, "sluice_accept_rate_pauses_total", 'listener="paced"')
    assert.is_true(pauses >= 1, tostring(pauses))
    assert.matches("listener paced: max_connection_rate %(4/s%) reached on worker %d: accepting "
                   .. "paused for %d+ ms", H.read(p.log))
    assert.are.equal(12, H.metric(admin, "sluice_connections_total", 'listener="paced"'))

    -- A reload lifts the limit: the next burst is accepted without a pause.
    local f = assert(io.open(p.config, "w"))
    f:write(config(nil))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 10))
    assert.are.equal(12, (burst(12)))
    assert.are.equal(pauses, H.metric(admin, "sluice_accept_rate_pauses_total", 'listener="paced"'))
    H.stop_sluice(p)
  end)

  it("pauses accepting at max_connections and resumes below it", function()
    local port = H.free_port()
    local alog = H.tmpfile("access.log")
    local p = H.start_sluice(([[
return {
  workers = 2,
  access_log = %q,
  listeners = { { name = "capped", listen = "127.0.0.1:%d", max_connections = 2,
                  pipeline = { "sluice.stages.echo" } } },
}
]]):format(alog, port), "SLUICE_LOG_LEVEL=debug")
    local a = held_client(port, "a\n")
    local b = held_client(port, "b\n")
    assert.truthy(H.wait_for(function() return H.read(a.out) == "a\n" and H.read(b.out) == "b\n" end, 10))
    -- A third connection completes in the kernel but is not accepted.
    local c = held_client(port, "c\n")
    c.release()
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("listener capped: 2 connections open, its max_connections: accepting paused", 1, true)
    end, 10))
    assert.are.equal(2, count(H.read(p.log), " accepted"))
    assert.are.equal("", H.read(c.out))
    -- One closes: the third is accepted and answered.
    a.release()
    assert.are.equal(0, a.finish())
    assert.are.equal(0, c.finish())
    assert.are.equal("c\n", H.read(c.out))
    local log = H.read(p.log)
    assert.matches("listener capped: below max_connections: accepting resumed", log, 1, true)
    assert.are.equal(3, count(log, " accepted"))
    b.release()
    assert.are.equal(0, b.finish())
    assert.truthy(H.wait_for(function() return #access_lines(alog) == 3 end, 10))
    H.stop_sluice(p)
  end)

  it("closes a client's connection beyond max_connections_per_client at once, over all workers",
    function()
      local port, admin = H.free_port(), H.free_port()
      local alog = H.tmpfile("access.log")
      local function conf(limit)
        return ([[
return {
  workers = 2,
  access_log = %q,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "capped", listen = "127.0.0.1:%d", max_connections_per_client = %d,
                  pipeline = { "sluice.stages.echo" } } },
}
]]):format(alog, admin, port, limit)
      end
      local p = H.start_sluice(conf(2))
      local function echoing(c, text)
        c.send(text)
        return c.recv(#text, 10) == text
      end
      -- Every connection comes from 127.0.0.1: two are served (on either
      -- worker), the third is closed as soon as it is accepted.
      local a, b = H.connect(port), H.connect(port)
      assert.is_true(echoing(a, "a"))
      assert.is_true(echoing(b, "b"))
      for _ = 1, 3 do
        local c = H.connect(port)
        assert.are.equal("", c.recv(1, 10))
        c.close()
      end
      assert.are.equal(3, H.metric(admin, "sluice_connections_limited_total", 'listener="capped"'))
      assert.are.equal(2, H.metric(admin, "sluice_connections_open", 'listener="capped"'))
      -- One leaves: there is room for one more, not two.
      a.close()
      assert.is_truthy(H.wait_for(function()
        return H.metric(admin, "sluice_connections_open", 'listener="capped"') == 1
      end, 10))
      local c = H.connect(port)
      assert.is_true(echoing(c, "c"))
      local d = H.connect(port)
      assert.are.equal("", d.recv(1, 10))
      d.close()
      -- A reload raises the limit: the listener keeps its counts.
      local f = assert(io.open(p.config, "w"))
      f:write(conf(3))
      f:close()
      H.sh("kill -HUP " .. p.pid)
      assert.is_truthy(H.wait_for(function()
        return H.read(p.log):find("configuration reloaded", 1, true)
      end, 10), H.read(p.log))
      local e = H.connect(port)
      assert.is_true(echoing(e, "e"))
      local g = H.connect(port)
      assert.are.equal("", g.recv(1, 10))
      g.close()
      for _, x in ipairs({ b, c, e }) do x.close() end
      assert.is_truthy(H.wait_for(function()
        return H.metric(admin, "sluice_connections_open", 'listener="capped"') == 0
      end, 10))
      local log = H.stop_sluice(p)
      local _, refused = log:gsub("on capped closed: max_connections_per_client %(2 open%)", "")
      assert.are.equal(4, refused, log)
      assert.matches("on capped closed: max_connections_per_client %(3 open%)", log)
      local lines = H.read(alog)
      local _, n = lines:gsub('reason="max_connections_per_client', "")
      assert.are.equal(5, n, lines)
    end)

  it("closes a connection idle for idle_timeout_ms with the reason idle_timeout", function()
    local port = H.free_port()
    local alog = H.tmpfile("access.log")
    local p = H.start_sluice(([[
return {
  access_log = %q,
  listeners = { { name = "quiet", listen = "127.0.0.1:%d", idle_timeout_ms = 200,
                  pipeline = { "sluice.stages.echo" } } },
}
]]):format(alog, port))
    -- Sends one line, then nothing: sluice closes it.
    local c = held_client(port, "x\n")
    assert.truthy(H.wait_for(function() return H.read(p.log):find("closed: idle_timeout", 1, true) end, 10))
    c.release()
    assert.are.equal(0, c.finish())
    assert.are.equal("x\n", H.read(c.out))
    local log = H.stop_sluice(p)
    assert.matches("client 127.0.0.1:%d+ on quiet closed: idle_timeout", log)
    local lines = access_lines(alog)
    assert.are.equal(1, #lines)
    assert.matches('listener=quiet upstream=%- worker=%d bytes_in=2 bytes_out=2 duration_ms=%d+ reason="idle_timeout"$',
                   lines[1])
    assert.is_true(tonumber(lines[1]:match("duration_ms=(%d+)")) >= 200)
  end)

  it("raises its soft open-files limit to the hard one at start, and says so", function()
    local port = H.free_port()
    local cfg = H.tmpfile("nofile.lua", ([[
return { workers = 1, listeners = { { name = "e", listen = "127.0.0.1:%d",
                                      pipeline = { "sluice.stages.echo" } } } }
]]):format(port))
    local p = H.spawn("sh -c " .. H.shq(("ulimit -Sn 256 && exec env SLUICE_ROOT=%s %s %s -c %s")
      :format(H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg))), "sluice")
    assert.is_truthy(H.wait_for(function() return H.read(p.log):find("started with", 1, true) end, 30),
                     H.read(p.log))
    local hard = tonumber((H.sh("sh -c 'ulimit -Hn'")))
    local limits = H.read("/proc/" .. p.pid .. "/limits")
    local soft = tonumber(limits:match("Max open files%s+(%d+)"))
    local log = H.stop_sluice(p)
    -- (Under valgrind, which keeps descriptors of its own above the limit
    -- it shows the program, the limit is valgrind's: only the stop counts.)
    if hard and hard > 256 and H.wrapper == "" then
      assert.are.equal(hard, soft)
      assert.matches("open files: soft limit raised from 256 to the hard limit, " .. hard, log, 1, true)
    end
  end)

  describe("on SIGTERM", function()
    it("stops accepting and lets an open connection finish, then exits 0", function()
      local sink = H.tmpfile("sink")
      local go = H.tmpfile("peer_go")
      -- The upstream answers only once the spec says so (after SIGTERM).
      local peer = H.start_peer(("cat > %s; while [ ! -e %s ]; do sleep 0.02; done; echo stored")
        :format(H.shq(sink), H.shq(go)))
      peers[#peers + 1] = peer
      local port = H.free_port()
      local p = H.start_sluice(([[
return {
  workers = 2, drain_timeout_ms = 60000,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, peer.port), "SLUICE_LOG_LEVEL=debug")
      local c = held_client(port, "payload\n")
      c.release() -- sends everything and half-closes; the reply is pending
      assert.truthy(H.wait_for(function() return H.read(sink) == "payload\n" end, 10))
      os.execute("kill -TERM " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("draining 2 open sockets", 1, true) end, 10))
      -- New connections are refused while the open one finishes (once the
      -- other worker, which had nothing open, has closed its listener too).
      assert.is_truthy(H.wait_for(function() return not H.port_open(port) end, 10))
      assert.is_true(H.alive(p))
      H.sh("touch " .. H.shq(go))
      assert.are.equal(0, c.finish())
      assert.are.equal("stored\n", H.read(c.out))
      local log = H.stop_sluice(p)
      assert.matches("SIGTERM: stopping", log, 1, true)
      assert.matches("drained", log, 1, true)
      assert.not_matches("closed: shutdown", log, 1, true)
    end)

    it("closes a connection still open at drain_timeout_ms with the reason shutdown", function()
      local port = H.free_port()
      local alog = H.tmpfile("access.log")
      local p = H.start_sluice(([[
return {
  drain_timeout_ms = 300, access_log = %q,
  listeners = { { name = "stuck", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } },
}
]]):format(alog, port))
      local c = held_client(port, "hi\n")
      assert.truthy(H.wait_for(function() return H.read(c.out) == "hi\n" end, 10))
      local log = H.stop_sluice(p)
      assert.matches("worker %d: drain deadline: closing 1 open sockets", log)
      assert.matches("on stuck closed: shutdown", log, 1, true)
      assert.matches('reason="shutdown"', H.read(alog), 1, true)
      c.release()
      assert.are.equal(0, c.finish())
    end)
  end)

  -- The idle timer of lua-api.md: restarted at each read (60 s; 50 ms on
  -- "soon"), cancelled in channel_inactive, closes its connection as "idle".
  -- A pending Lua timer keeps no worker running once its connections are
  -- gone, and still fires for a connection that is open while draining.
  describe("with a pending Lua timer", function()
    local IDLE = [[
local function restart(ctx, ms)
  if ctx.state.idle then ctx.state.idle:cancel() end
  ctx.state.idle = ctx:after(ms, function(c) c:close("idle") end)
end
return {
  channel_active = function(ctx) restart(ctx, 60000); ctx:fire_active() end,
  channel_read = function(ctx, buf)
    restart(ctx, buf:tostring():find("soon", 1, true) and 50 or 60000)
    ctx:fire_read(buf)
  end,
  channel_inactive = function(ctx) ctx.state.idle:cancel(); ctx:fire_inactive() end,
}
]]
    local function start(drain_ms)
      local mod = H.tmpfile("idle_timer.lua", IDLE):match("([^/]+)%.lua$")
      local port = H.free_port()
      return H.start_sluice(([[
return { workers = 1, drain_timeout_ms = %d,
  listeners = { { name = "timed", listen = "127.0.0.1:%d", pipeline = { %q, "sluice.stages.echo" } } } }
]]):format(drain_ms, port, mod)), port
    end

    it("stops at once after its connection closed, with the timer still armed", function()
      -- (drain_timeout_ms is long: a worker kept running by the timer
      -- would outlast H.stop's wait, and then exit 3.)
      local p, port = start(60000)
      assert.are.equal("hello\n", H.exchange(port, "hello\n", 10))
      assert.truthy(H.wait_for(function() return H.read(p.log):find("on timed closed: eof", 1, true) end, 10))
      local log = H.stop_sluice(p)
      assert.not_matches("has not stopped", log, 1, true)
    end)

    it("closes a connection still open with its timer at drain_timeout_ms, and exits 0", function()
      local p, port = start(300)
      local c = held_client(port, "hi\n")
      assert.truthy(H.wait_for(function() return H.read(c.out) == "hi\n" end, 10))
      local log = H.stop_sluice(p)
      assert.matches("worker 0: drain deadline: closing 1 open sockets", log, 1, true)
      assert.matches("on timed closed: shutdown", log, 1, true)
      assert.not_matches("closed: idle", log, 1, true)
      c.release()
      assert.are.equal(0, c.finish())
    end)

    it("fires a timer of a connection open while draining, which then ends the drain", function()
      local p, port = start(60000)
      local go, echoed = H.tmpfile("soon_go"), H.tmpfile("soon.out", "")
      -- Sends "hi", notes its echo, sends "soon" once told, and stays open
      -- (its sleep) until sluice closes the connection.
      local talker = H.tmpfile("soon.sh", ("printf 'hi\\n'; read -r line; echo \"$line\" > %s; "
                                           .. "while [ ! -e %s ]; do sleep 0.02; done; "
                                           .. "printf 'soon\\n'; exec sleep 60\n")
                                           :format(H.shq(echoed), H.shq(go)))
      local client = H.spawn(("socat -T 60 EXEC:'sh %s' TCP:127.0.0.1:%d"):format(talker, port),
                             "client")
      finally(function() H.stop(client, "KILL") end)
      assert.truthy(H.wait_for(function() return H.read(echoed) == "hi\n" end, 10))
      os.execute("kill -TERM " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("draining 1 open sockets", 1, true) end, 10))
      H.sh("touch " .. H.shq(go))
      -- The timer closes it; the worker has drained and sluice exits by itself.
      assert.truthy(H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 20), H.read(p.log))
      local log = H.stop_sluice(p)
      assert.matches("on timed closed: idle", log, 1, true)
      assert.matches("worker 0: drained", log, 1, true)
      assert.not_matches("closed: shutdown", log, 1, true)
    end)
  end)

  it("closes a proxied connection at drain_timeout_ms as shutdown, its upstream as peer closed", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local port = H.free_port()
    local alog = H.tmpfile("access.log")
    local p = H.start_sluice(([[
return {
  workers = 2, drain_timeout_ms = 300, access_log = %q,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(alog, port, echo.port))
    local c = held_client(port, "hi\n")
    assert.truthy(H.wait_for(function() return H.read(c.out) == "hi\n" end, 10))
    local log = H.stop_sluice(p)
    assert.matches("on front closed: shutdown", log, 1, true)
    assert.matches("for front closed: peer closed", log, 1, true)
    assert.matches('listener=front .* reason="shutdown"', H.read(alog))
    c.release()
    assert.are.equal(0, c.finish())
  end)

  it("exits 3 on SIGTERM, naming the worker, when a Lua stage never returns", function()
    local spin_port, echo_port, admin = H.free_port(), H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1, drain_timeout_ms = 0, admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "spin", listen = "127.0.0.1:%d", pipeline = { "spec.fixtures.stages.spins_on_read" } },
    { name = "echo", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
  },
}
]]):format(admin, spin_port, echo_port))
    local talker = H.tmpfile("talker.sh", "printf x\nexec sleep 60\n")
    local client = H.spawn(("socat -T 60 EXEC:'sh %s' TCP:127.0.0.1:%d"):format(talker, spin_port),
                           "client")
    -- The worker is stuck once it no longer answers on the other listener.
    assert.truthy(H.wait_for(function()
      return select(2, H.sh(("printf 'y' | timeout 2 socat -t 1 - TCP:127.0.0.1:%d | grep -q y")
                              :format(echo_port))) ~= 0
    end, 20))
    -- A scrape leaves the worker out, and says so in the log. (It waits 2 s
    -- for the worker; under valgrind, whose threads take turns, the
    -- spinning one makes everything else slow: the answer may take longer,
    -- and a scrape may end with no answer at all, so it is asked again.)
    local answering
    H.wait_for(function()
      answering = H.metric(admin, "sluice_workers_answering", nil, 120)
      return answering ~= nil
    end, 240)
    assert.are.equal(0, answering)
    assert.matches("admin: worker 0 did not answer within 2 s: it is not returning to its event "
                   .. "loop (a Lua stage that never returns?); not waited for again until it "
                   .. "answers", H.read(p.log), 1, true)
    -- The next scrape leaves it out without asking it again (no second
    -- wait, no second line).
    assert.are.equal(0, H.metric(admin, "sluice_workers_answering", nil, 120))
    assert.are.equal(1, select(2, H.read(p.log):gsub("did not answer within 2 s", "")))
    local rc = H.stop(p, "TERM", 60)
    H.stop(client, "TERM")
    assert.are.equal(3, rc)
    local log = H.read(p.log)
    assert.matches("worker 0 has not stopped 5 s after the drain deadline: it does not return to "
                   .. "its event loop (a Lua stage that never returns?)", log, 1, true)
    assert.matches("[error] stopped without its stuck workers (exit 3)", log, 1, true)
  end)

  it("closes everything at once on a second SIGTERM while draining", function()
    local port = H.free_port()
    local p = H.start_sluice(([[
return { drain_timeout_ms = 600000,
  listeners = { { name = "held", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port))
    local c = held_client(port, "hi\n")
    assert.truthy(H.wait_for(function() return H.read(c.out) == "hi\n" end, 10))
    os.execute("kill -TERM " .. p.pid)
    assert.truthy(H.wait_for(function() return H.read(p.log):find("draining 1 open sockets", 1, true) end, 10))
    local log = H.stop_sluice(p)
    assert.matches("SIGTERM again: closing every connection now", log, 1, true)
    assert.matches("on held closed: shutdown", log, 1, true)
    c.release()
    assert.are.equal(0, c.finish())
  end)

  describe("on SIGHUP", function()
    -- A stage module that tags what the client sends with its version.
    local function tag_stage(dir, version)
      local f = assert(io.open(dir .. "/tagger.lua", "wb"))
      f:write(([[
local TAG = %q
return {
  channel_read = function(ctx, buf)
    local s = buf:tostring()
    buf:release()
    ctx:fire_read(TAG .. ":" .. s)
  end,
}
]]):format(version))
      f:close()
    end

    it("gives new connections the new pipeline and listeners, and drops no open one", function()
      local dir = H.tmpdir() .. "/reload_" .. H.free_port()
      H.sh("mkdir -p " .. H.shq(dir))
      tag_stage(dir, "v1")
      local echo = echo_peer()
      local port, gone, extra = H.free_port(), H.free_port(), H.free_port()
      local cfg_path = dir .. "/sluice.lua"
      local function write_config(listeners)
        local f = assert(io.open(cfg_path, "wb"))
        f:write(([[
return {
  workers = 2,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = { "tagger" } },
    %s
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, listeners, echo.port))
        f:close()
      end
      write_config(('{ name = "gone", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },')
        :format(gone))
      local p = H.spawn(("env SLUICE_ROOT=%s %s %s -c %s"):format(H.shq(H.root), H.wrapper,
        H.shq(H.bin), H.shq(cfg_path)), "sluice")
      assert.truthy(H.wait_for(function() return H.read(p.log):find("started with", 1, true) end, 30),
                    H.read(p.log))
      -- Connections opened before the reload, mid-conversation.
      local held = {}
      for i = 1, 6 do
        held[i] = held_client(port, "before\n", "after\n")
      end
      assert.truthy(H.wait_for(function()
        for _, c in ipairs(held) do
          if H.read(c.out) ~= "v1:before\n" then return false end
        end
        return true
      end, 10))
      -- Short connections one after another, all through the reload.
      local replies, stop, sent = H.tmpfile("replies", ""), H.tmpfile("stop"), H.tmpfile("sent")
      local loop = H.spawn(("sh -c %s"):format(H.shq((
        "n=0; while [ ! -e %s ]; do printf 'ping\\n' | timeout 10 socat -t 5 - TCP:127.0.0.1:%d >> %s; " ..
        "n=$((n+1)); done; echo $n > %s"):format(H.shq(stop), port, H.shq(replies), H.shq(sent)))), "loop")
      assert.truthy(H.wait_for(function() return H.read(replies):find("v1:ping", 1, true) end, 10))
      -- The new configuration: the stage module changed, "gone" removed, "extra" added.
      tag_stage(dir, "v2")
      write_config(('{ name = "extra", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },')
        :format(extra))
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function()
        return H.read(p.log):find("configuration reloaded", 1, true)
      end, 10), H.read(p.log))
      assert.truthy(H.wait_for(function() return H.read(replies):find("v2:ping", 1, true) end, 10))
      H.sh("touch " .. H.shq(stop))
      assert.truthy(H.wait_for(function() return tonumber(H.read(sent)) end, 20))
      assert.truthy(H.wait_for(function() return tonumber(H.read(loop.rc_file)) end, 10))
      -- Every short connection was answered, by one pipeline or the other.
      local n = tonumber(H.read(sent))
      local got = H.read(replies)
      assert.are.equal(n, count(got, "[^\n]+\n"), got)
      assert.are.equal(n, count(got, "v[12]:ping\n"), got)
      -- New connections: the new stage; the new listener serves, the removed one is gone.
      assert.are.equal("v2:new\n", (H.exchange(port, "new\n", 10)))
      assert.are.equal("more\n", (H.exchange(extra, "more\n", 10)))
      assert.is_false(H.port_open(gone))
      -- The connections opened before keep their stage (the module as it was).
      for _, c in ipairs(held) do c.release() end
      for _, c in ipairs(held) do
        assert.are.equal(0, c.finish())
        assert.are.equal("v1:before\nv1:after\n", H.read(c.out))
      end
      local log = H.stop_sluice(p)
      assert.matches("2 listeners (1 kept, 1 added, 1 removed)", log, 1, true)
      assert.not_matches("reset", log, 1, true)
      assert.not_matches("stage tagger failed", log, 1, true)
    end)

    it("refuses an invalid configuration, logs why, and keeps serving the old one", function()
      local port = H.free_port()
      local p = H.start_sluice(([[
return { workers = 2,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port))
      local f = assert(io.open(p.config, "wb"))
      f:write([[return { listeners = { { name = "e", listen = 7000, pipeline = { "sluice.stages.echo" } } } }]])
      f:close()
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("reload refused", 1, true) end, 10))
      assert.matches('SIGHUP: reload refused, the running configuration stays: config error: '
                     .. 'listeners[1].listen: expected "host:port", got 7000', H.read(p.log), 1, true)
      assert.are.equal("still\n", (H.exchange(port, "still\n", 10)))
      -- A valid file whose new address cannot be bound is refused too.
      local holder = H.start_echo()
      peers[#peers + 1] = holder
      f = assert(io.open(p.config, "wb"))
      f:write(([[
return { workers = 2, listeners = {
  { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
  { name = "taken", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port, holder.port))
      f:close()
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function()
        return H.read(p.log):find("cannot listen on 127.0.0.1:" .. holder.port, 1, true)
      end, 10))
      assert.are.equal("again\n", (H.exchange(port, "again\n", 10)))
      local log = H.stop_sluice(p)
      assert.not_matches("configuration reloaded", log, 1, true)
    end)

    it("refuses a configuration that never finishes, and still stops on SIGTERM", function()
      local port = H.free_port()
      local p = H.start_sluice(([[
return { workers = 1,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port))
      local f = assert(io.open(p.config, "wb"))
      f:write("while true do end\n")
      f:close()
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("reload refused", 1, true) end, 60))
      assert.matches("SIGHUP: reload refused, the running configuration stays: config error: "
                     .. p.config .. ": still running after 100000000 Lua instructions "
                     .. "(a loop that never ends?)", H.read(p.log), 1, true)
      assert.are.equal("still\n", (H.exchange(port, "still\n", 10)))
      H.stop_sluice(p)
    end)

    it("refuses os.exit from a configuration and from a stage, and keeps serving", function()
      local port, exit_port = H.free_port(), H.free_port()
      local p = H.start_sluice(([[
return { workers = 1,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
                { name = "x", listen = "127.0.0.1:%d",
                  pipeline = { "spec.fixtures.stages.exits_on_read" } } } }
]]):format(port, exit_port))
      assert.are.equal("", (H.exchange(exit_port, "bye\n", 10)))
      local f = assert(io.open(p.config, "wb"))
      f:write("os.exit(0)\n")
      f:close()
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("reload refused", 1, true) end, 20))
      assert.are.equal("still\n", (H.exchange(port, "still\n", 10)))
      local log = H.stop_sluice(p)
      local refused = "os.exit is refused: it would end every connection of sluice (a stage closes "
                      .. "its own with ctx:close; SIGTERM stops sluice)"
      assert.matches("SIGHUP: reload refused, the running configuration stays: config error: "
                     .. p.config .. ":1: " .. refused, log, 1, true)
      assert.matches("stage spec.fixtures.stages.exits_on_read raised in channel_read on client "
                     .. "127.0.0.1:", log, 1, true)
      assert.matches("exits_on_read.lua:5: " .. refused, log, 1, true)
    end)

    it("refuses a reload that a worker cannot load, and keeps the stages it runs", function()
      local flag = H.tmpfile("refuse_flag")
      -- Raises only inside a worker's Lua state (where sluice.host is
      -- loaded), and only while the flag file exists: the configuration
      -- checks pass, a worker's load fails.
      local stage = H.tmpfile("picky.lua", ([[
local f = io.open(%q)
if f then
  f:close()
  if package.loaded["sluice.host"] then error("refusing to load in a worker") end
end
return {
  channel_read = function(ctx, buf)
    local s = buf:tostring()
    buf:release()
    ctx:fire_read("p:" .. s)
  end,
}
]]):format(flag))
      local mod = stage:match("([^/]+)%.lua$")
      local port = H.free_port()
      local p = H.start_sluice(([[
return { workers = 2,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { %q, "sluice.stages.echo" } } } }
]]):format(port, mod))
      assert.are.equal("p:a\n", (H.exchange(port, "a\n", 10)))
      H.sh("touch " .. H.shq(flag))
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("reload refused", 1, true) end, 10))
      assert.matches("SIGHUP: reload refused, the running configuration stays: worker 0: stage "
                     .. mod .. ": [^\n]*refusing to load in a worker", H.read(p.log))
      assert.are.equal("p:b\n", (H.exchange(port, "b\n", 10)))
      H.sh("rm -f " .. H.shq(flag))
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("configuration reloaded", 1, true) end, 10))
      assert.are.equal("p:c\n", (H.exchange(port, "c\n", 10)))
      H.stop_sluice(p)
    end)

    it("keeps workers as they are until the next start, and says so", function()
      local port = H.free_port()
      local text = ([[
return { workers = 1,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port)
      local p = H.start_sluice(text)
      local f = assert(io.open(p.config, "wb"))
      f:write((text:gsub("workers = 1", "workers = 2")))
      f:close()
      os.execute("kill -HUP " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("configuration reloaded", 1, true) end, 10))
      assert.are.equal("x\n", (H.exchange(port, "x\n", 10)))
      local log = H.stop_sluice(p)
      assert.matches("SIGHUP: workers changed: takes effect at the next start", log, 1, true)
      assert.not_matches("allocator or leak_detection changed", log, 1, true)
      assert.are.equal(1, count(log, "pool clean at exit"))
    end)

    it("reopens the access log (and on SIGUSR1), for rotation", function()
      local port = H.free_port()
      local alog = H.tmpfile("access.log")
      local p = H.start_sluice(([[
return { access_log = %q,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(alog, port))
      assert.are.equal("one\n", (H.exchange(port, "one\n", 10)))
      assert.truthy(H.wait_for(function() return #access_lines(alog) == 1 end, 10))
      H.sh(("mv %s %s.1"):format(H.shq(alog), H.shq(alog)))
      os.execute("kill -USR1 " .. p.pid)
      assert.truthy(H.wait_for(function() return H.read(p.log):find("log files reopened", 1, true) end, 10))
      assert.are.equal("two\n", (H.exchange(port, "two\n", 10)))
      assert.truthy(H.wait_for(function() return #access_lines(alog) == 1 end, 10))
      assert.are.equal(1, #access_lines(alog .. ".1"))
      H.stop_sluice(p)
    end)

    it("says so when SIGUSR1 cannot reopen the access log, and keeps writing where it did", function()
      local port = H.free_port()
      local dir = H.tmpfile("logs")
      H.sh("mkdir -p " .. H.shq(dir))
      local alog = dir .. "/access.log"
      local p = H.start_sluice(([[
return { access_log = %q,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(alog, port))
      H.sh(("mv %s %s.old"):format(H.shq(dir), H.shq(dir)))   -- its folder is gone
      os.execute("kill -USR1 " .. p.pid)
      assert.truthy(H.wait_for(function()
        return H.read(p.log):find("SIGUSR1: log files reopened but for the one above", 1, true)
      end, 10), H.read(p.log))
      assert.are.equal("one\n", (H.exchange(port, "one\n", 10)))
      assert.truthy(H.wait_for(function() return #access_lines(dir .. ".old/access.log") == 1 end, 10))
      local log = H.stop_sluice(p)
      assert.matches("access_log: cannot open " .. alog, log, 1, true)
      assert.not_matches("SIGUSR1: log files reopened\n", log, 1, true)
    end)
  end)

  it("writes its log to error_log, and reopens it on SIGUSR1", function()
    local port = H.free_port()
    local elog = H.tmpfile("error.log")
    local cfg = H.tmpfile("elog.lua", ([[
return { error_log = %q,
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(elog, port))
    local p = H.spawn(("env SLUICE_ROOT=%s %s %s -c %s"):format(H.shq(H.root), H.wrapper,
      H.shq(H.bin), H.shq(cfg)), "sluice")
    assert.truthy(H.wait_for(function() return H.read(elog):find("started with", 1, true) end, 30))
    assert.are.equal("one\n", (H.exchange(port, "one\n", 10)))
    assert.truthy(H.wait_for(function() return H.read(elog):find("on e closed: eof", 1, true) end, 10))
    H.sh(("mv %s %s.1"):format(H.shq(elog), H.shq(elog)))
    os.execute("kill -USR1 " .. p.pid)
    assert.truthy(H.wait_for(function() return H.read(elog):find("log files reopened", 1, true) end, 10))
    assert.are.equal(0, H.stop(p, "TERM"))
    local log = H.read(elog)
    assert.matches("pool clean at exit", log, 1, true)
    assert.not_matches("started with", log, 1, true)
    assert.matches("started with", H.read(elog .. ".1"), 1, true)
    -- Nothing went to standard error.
    assert.are.equal("", H.read(p.log))
  end)
end)
