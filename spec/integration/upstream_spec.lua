-- Upstreams through the real binary: balancing across real backends (socat
-- peers that answer with their name), retries, passive and active health,
-- and ctx:connect from a Lua stage. Every wait is bounded.
local H = require("helpers")

-- A config with one listener "front" on port and an upstream "back"; up is
-- the text of the upstream table's other keys. One worker unless `workers`
-- is given: each worker balances and counts on its own, so exact counts
-- need one.
local function config(port, servers, up, workers)
  local list = {}
  for i, s in ipairs(servers) do
    list[i] = type(s) == "number" and ('"127.0.0.1:%d"'):format(s) or s
  end
  return ([[
return {
  workers = %d,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { %s }%s } },
}
]]):format(workers or 1, port, table.concat(list, ", "), up and (", " .. up) or "")
end

local function count_of(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

describe("upstreams", function()
  local peers = H.killed_after_each()
  local function peer(name, port)
    local p = H.start_named_peer(name, port)
    peers[#peers + 1] = p
    return p
  end

  it("spread connections across two backends in turn (round robin)", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }))
    local count = H.spread(port, 12)
    local log = H.stop_sluice(p)
    assert.are.equal(6, count.A, log)
    assert.are.equal(6, count.B, log)
    assert.not_matches("connect failed", log, 1, true)
  end)

  it("spread connections with two workers, each taking its own turns", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }, nil, 2))
    local count = H.spread(port, 12)
    local log = H.stop_sluice(p)
    -- Each worker alternates: the split is off by at most one per worker.
    assert.are.equal(12, (count.A or 0) + (count.B or 0), log)
    assert.is_true(count.A >= 5 and count.B >= 5, ("A %s, B %s"):format(count.A, count.B))
  end)

  it("spread by weight", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { ('{ "127.0.0.1:%d", weight = 3 }'):format(a.port), b.port }))
    local count = H.spread(port, 12)
    H.stop_sluice(p)
    assert.are.equal(9, count.A)
    assert.are.equal(3, count.B)
  end)

  it("move new connections to the other backend when one stops, with no client-visible error", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }))
    local before = H.spread(port, 4)
    assert.are.equal(2, before.A)
    assert.are.equal(2, before.B)
    H.stop(a, "KILL")   -- backend A goes away mid-run
    assert.is_false(H.port_open(a.port))
    local after, replies = H.spread(port, 8)
    local log = H.stop_sluice(p)
    -- Every client got its answer: the one connect that found A gone was
    -- retried on B, and A was then skipped.
    assert.are.equal(8, after.B, replies .. "\n" .. log)
    assert.are.equal(1, count_of(log, "upstream 127%.0%.0%.1:" .. a.port .. " for front closed: connect failed: Connection refused"), log)
    assert.matches("upstream back: server 127.0.0.1:" .. a.port .. " skipped for 10000 ms after 1 failed connect in a row",
                   log, 1, true)
    assert.not_matches("upstream_unavailable", log, 1, true)
  end)

  it("close the client with upstream_unavailable when every server is down, naming them", function()
    local d1, d2 = H.free_port(), H.free_port()
    local port = H.free_port()
    local p = H.start_sluice(config(port, { d1, d2 }))
    local outs = {}
    for i = 1, 3 do
      local out, rc = H.exchange(port, "x", 10)
      assert.are.equal(0, rc)
      outs[i] = out
    end
    local log = H.stop_sluice(p)
    assert.are.same({ "", "", "" }, outs)
    -- First client: both tried. Second: both are marked down, so it fails at
    -- once and the marks are cleared. Third: both tried again.
    local tried = ("client 127%%.0%%.0%%.1:%%d+ on front: upstream back unavailable after 2 tries: "
                   .. "127%%.0%%.0%%.1:%d %%(Connection refused%%), 127%%.0%%.0%%.1:%d %%(Connection refused%%)")
    assert.are.equal(2, count_of(log, tried:format(d1, d2)) + count_of(log, tried:format(d2, d1)), log)
    assert.matches("upstream back unavailable: no server available (down: 127.0.0.1:" .. d1 .. ", 127.0.0.1:"
                   .. d2 .. ")", log, 1, true)
    assert.are.equal(3, count_of(log, "on front closed: upstream_unavailable"), log)
  end)

  it("retry a server that does not answer in connect_timeout_ms on the next one", function()
    local hole, close_hole = H.blackhole()
    local b = peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { hole, b.port }, "connect_timeout_ms = 300"))
    local out = H.exchange(port, "x", 10)
    close_hole()
    local log = H.stop_sluice(p)
    assert.are.equal("Bx", out)
    assert.matches("upstream 127.0.0.1:" .. hole .. " for front closed: connect failed: timed out", log, 1, true)
  end)

  it("abandon a connect in progress when sluice stops, leaving nothing behind", function()
    local hole, close_hole = H.blackhole()
    local port = H.free_port()
    local text = config(port, { hole }, "connect_timeout_ms = 60000")
      :gsub("workers = 1,", "workers = 1, drain_timeout_ms = 0,")
    local p = H.start_sluice(text, "SLUICE_LOG_LEVEL=debug")
    local held = H.spawn(("socat -t 5 SYSTEM:'printf h; sleep 20' TCP:127.0.0.1:%d"):format(port), "held")
    local waiting = H.wait_for(function() return H.read(p.log):find("on front accepted", 1, true) end, 10)
    local log = H.stop_sluice(p)   -- exit 0, pool clean, nothing leaked
    H.stop(held, "KILL")
    close_hole()
    assert.is_truthy(waiting)
    assert.matches("upstream 127.0.0.1:" .. hole .. " for front closed: ", log, 1, true)
    assert.not_matches("connect failed", log, 1, true)
  end)

  it("try at most `tries` servers", function()
    local d1, d2 = H.free_port(), H.free_port()
    local b = peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { d1, d2, b.port }, "tries = 2"))
    local out = H.exchange(port, "x", 10)
    local log = H.stop_sluice(p)
    assert.are.equal("", out)   -- the third server would have answered
    assert.matches("upstream back unavailable after 2 tries: 127.0.0.1:" .. d1 .. " (Connection refused), "
                   .. "127.0.0.1:" .. d2 .. " (Connection refused)", log, 1, true)
  end)

  -- Clients that spoke before sluice accepted them (it is stopped while they
  -- connect and send): their bytes are read at accept and written with the
  -- upstream's connect (speculative I/O), so a refused connect is seen by
  -- that write, not by EV_WRITE and SO_ERROR.
  local function send_while_stopped(p, port, inputs)
    assert.are.equal(0, os.execute(("kill -STOP %d"):format(p.pid)) and 0 or 1)
    local clients = {}
    for i, input in ipairs(inputs) do
      local out = H.tmpfile("out")
      clients[i] = H.spawn(("(socat -t 10 - TCP:127.0.0.1:%d <%s >%s)"):format(
        port, H.shq(H.tmpfile("in", input)), H.shq(out)), "client")
      clients[i].out = out
    end
    H.sleep(0.3)   -- connected and sent, waiting in the listen queue
    os.execute(("kill -CONT %d"):format(p.pid))
    local outs = {}
    for i, c in ipairs(clients) do
      assert.are.equal(0, H.stop(c, "CONT", 20))   -- a no-op signal: waits for its end
      outs[i] = H.read(c.out)
    end
    return outs
  end

  it("retry a connect refused to a write sent with it, carrying the client's bytes to the next server", function()
    local d = H.free_port()
    local b = peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { d, b.port }))
    local outs = send_while_stopped(p, port, { "x1", "x2" })
    local log = H.stop_sluice(p)
    -- Round robin tries d first: one client is refused there, its bytes go
    -- to B, and d is then skipped. Both get the whole answer.
    table.sort(outs)
    assert.are.same({ "Bx1", "Bx2" }, outs, log)
    assert.are.equal(1, count_of(log, "upstream 127%.0%.0%.1:" .. d .. " for front closed: connect failed: Connection refused"), log)
    assert.not_matches("upstream_unavailable", log, 1, true)
  end)

  it("release the bytes sent with refused connects when every try fails", function()
    local d1, d2 = H.free_port(), H.free_port()
    local port = H.free_port()
    local p = H.start_sluice(config(port, { d1, d2 }))
    local outs = send_while_stopped(p, port, { "x1" })
    local log = H.stop_sluice(p)   -- checks the pool is clean
    assert.are.same({ "" }, outs)
    assert.matches("upstream back unavailable after 2 tries: 127.0.0.1:" .. d1 .. " (Connection refused), "
                   .. "127.0.0.1:" .. d2 .. " (Connection refused)", log, 1, true)
  end)

  it("keep a client on one server with hash, and move it when that server stops", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }, 'balance = "hash"'))
    local first = H.spread(port, 6)
    local home = first.A == 6 and "A" or "B"
    assert.are.equal(6, first[home])
    H.stop(home == "A" and a or b, "KILL")
    local after = H.spread(port, 4)
    local log = H.stop_sluice(p)
    local other = home == "A" and "B" or "A"
    assert.are.equal(4, after[other], log)
    assert.not_matches("upstream_unavailable", log, 1, true)
  end)

  it("send new connections to the server with fewer open ones (least_conn)", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }, 'balance = "least_conn"'))
    -- One client stays connected to A (the first pick when both are idle).
    local held = H.spawn(("socat -t 5 SYSTEM:'printf h; head -c 1 >&2; sleep 20' TCP:127.0.0.1:%d"):format(port), "held")
    local connected = H.wait_for(function() return H.read(held.log):find("A", 1, true) end, 10)
    local count = H.spread(port, 4)
    H.stop(held, "KILL")
    local log = H.stop_sluice(p)
    assert.is_truthy(connected, H.read(held.log))
    assert.are.equal(4, count.B, log)
  end)

  it("send new connections to the less busy of two random choices (random_two)", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port, b.port }, 'balance = "random_two"'))
    -- One client stays connected, to whichever server was drawn first.
    local held = H.spawn(("socat -t 5 SYSTEM:'printf h; head -c 1 >&2; sleep 20' TCP:127.0.0.1:%d"):format(port), "held")
    local busy = H.wait_for(function() return H.read(held.log):match("[AB]") end, 10)
    -- With two servers both are always the two choices: the idle one wins.
    local count = H.spread(port, 4)
    H.stop(held, "KILL")
    local log = H.stop_sluice(p)
    assert.is_truthy(busy, H.read(held.log))
    local idle = busy == "A" and "B" or "A"
    assert.are.equal(4, count[idle], log)
  end)

  it("skip a server its health checks find down, and use it again once they pass", function()
    local dead = H.free_port()
    local b = peer("B")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { dead, b.port },
      "max_fails = 0, health_check = { interval_ms = 1000, timeout_ms = 1000, fails = 1, passes = 2 }"))
    local down = H.wait_for(function()
      return H.read(p.log):find("upstream back: server 127.0.0.1:" .. dead .. " is down (health check: 1 failed in a row, last: Connection refused)", 1, true)
    end, 10)
    assert.is_truthy(down, H.read(p.log))
    local while_down = H.spread(port, 4)
    assert.are.equal(4, while_down.B)
    assert.not_matches("connect failed", H.read(p.log), 1, true)   -- never tried
    peer("A", dead)
    local up = H.wait_for(function()
      return H.read(p.log):find("upstream back: server 127.0.0.1:" .. dead .. " is up (health check: 2 passed in a row)", 1, true)
    end, 10)
    local after = H.spread(port, 4)
    local log = H.stop_sluice(p)
    assert.is_truthy(up, log)
    assert.are.equal(2, after.A, log)
    assert.are.equal(2, after.B, log)
  end)

  it("do not count sluice's own shortage of descriptors against a server", function()
    local a = H.start_named_peer("A")
    local port = H.free_port()
    local p = H.start_sluice(config(port, { a.port }))
    -- Room for one proxied connection (two descriptors) and one accept
    -- more: that connection's upstream socket() fails with EMFILE. (The
    -- limit bounds descriptor numbers: the next three free ones fit.)
    local function open_fds()
      local used = {}
      for fd in H.sh(("ls /proc/%d/fd"):format(p.pid)):gmatch("%d+") do used[tonumber(fd)] = true end
      return used
    end
    local used, free, n = open_fds(), 0, -1
    while free < 3 do
      n = n + 1
      if not used[n] then free = free + 1 end
    end
    local base = 0
    for _ in pairs(used) do base = base + 1 end
    local _, rc = H.sh(("prlimit --pid %d --nofile=%d:%d"):format(p.pid, n + 1, n + 1))
    assert.are.equal(0, rc)
    local held = H.connect(port)
    assert.are.equal("A", held.recv(1, 10))
    local c = H.connect(port)
    assert.are.equal("", c.recv(1, 10))   -- closed: no upstream socket
    c.close()
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("short of resources (Too many open files)", 1, true)
    end, 10), H.read(p.log))
    held.close()
    assert.is_truthy(H.wait_for(function()
      return tonumber((H.sh(("ls /proc/%d/fd | wc -l"):format(p.pid)))) == base
    end, 10))
    -- The server was not skipped: the next connection is served.
    assert.are.equal("Ax", (H.exchange(port, "x", 10)))
    local log = H.stop_sluice(p)
    assert.not_matches("skipped for", log, 1, true)
  end)

  it("check servers by what they answer: send and expect, as for redis PING", function()
    local redis = H.start_redis()
    peers[#peers + 1] = redis
    -- Each wrong in its own way: an error then a close; 20000 bytes of
    -- something else (more than a check reads); silence.
    local closes = H.start_peer([[printf '%s\r\n' '-ERR nope']])
    local chatty = H.start_peer("head -c 20000 /dev/zero; sleep 5")
    local silent = H.start_peer("sleep 5")
    for _, q in ipairs({ closes, chatty, silent }) do peers[#peers + 1] = q end
    local port = H.free_port()
    local p = H.start_sluice(config(port, { redis.port, closes.port, chatty.port, silent.port },
      -- A timeout long enough that a loaded machine never fails the redis-server
      -- (the silent peer sleeps longer than it).
      [[max_fails = 0, tries = 1, health_check = { interval_ms = 2500, timeout_ms = 2000, fails = 1,
        send = "PING\r\n", expect = "+PONG" }]]))
    local function down(q, why)
      return H.wait_for(function()
        return H.read(p.log):find(("upstream back: server 127.0.0.1:%d is down (health check: 1 failed "
                                   .. "in a row, last: %s)"):format(q.port, why), 1, true)
      end, 10)
    end
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find(("server 127.0.0.1:%d is down %%(health check: 1 failed in a row, last: "
                                 .. 'step 2: expected "%%+PONG" not found in %%d+ bytes? read %%(the server '
                                 .. "closed%%)%%)"):format(closes.port))
    end, 10), H.read(p.log))
    assert.is_truthy(down(chatty, 'step 2: expected "+PONG" not found in 16384 bytes read (the read '
                                  .. "limit of 16384 bytes per check)"), H.read(p.log))
    assert.is_truthy(down(silent, 'step 2: expected "+PONG" not found in 0 bytes read (timed out)'),
                     H.read(p.log))
    -- Only the redis-server is left to serve: every client gets PONG.
    for _ = 1, 6 do
      local out, rc = H.sh(("redis-cli -p %d PING"):format(port))
      assert.are.equal(0, rc)
      assert.are.equal("PONG\n", out)
    end
    local log = H.stop_sluice(p)
    assert.not_matches("server 127.0.0.1:" .. redis.port .. " is down", log, 1, true)
  end)

  it("use the new servers after a reload, with their own health checks", function()
    local a, b = peer("A"), peer("B")
    local port = H.free_port()
    local hc = "health_check = { interval_ms = 500 }"
    local p = H.start_sluice(config(port, { a.port }, hc))
    -- A client that stays connected across the reload, to A.
    local held = H.spawn(("socat -t 5 SYSTEM:'printf h; head -c 1 >&2; sleep 20' TCP:127.0.0.1:%d"):format(port), "held")
    assert.truthy(H.wait_for(function() return H.read(held.log):find("A", 1, true) end, 10))
    assert.are.equal("Ax", (H.exchange(port, "x", 10)))
    local f = assert(io.open(p.config, "w"))
    f:write(config(port, { b.port }, hc))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    local after = H.spread(port, 3)
    local still = H.alive(held)
    H.stop(held, "KILL")
    local log = H.stop_sluice(p)
    assert.are.equal(3, after.B, log)
    assert.is_true(still)
  end)

  describe("examples/config/redis_pool.lua with two redis-servers", function()
    local path = H.root .. "/examples/config/redis_pool.lua"

    it("passes sluice --check", function()
      local out, rc = H.sh(H.shq(H.bin) .. " --check " .. H.shq(path) .. " 2>&1")
      assert.are.equal(0, rc, out)
      assert.matches("config ok", out, 1, true)
    end)

    it("spreads redis-cli connections by weight, and keeps answering when a server stops", function()
      local r1, r2 = H.start_redis(), H.start_redis()
      peers[#peers + 1] = r1
      peers[#peers + 1] = r2
      local port = H.free_port()
      local p = H.start_sluice(H.read(path), ("SLUICE_EXAMPLE_LISTEN=127.0.0.1:%d SLUICE_EXAMPLE_SERVERS=127.0.0.1:%d,127.0.0.1:%d")
        :format(port, r1.port, r2.port))
      local served = {}
      for _ = 1, 6 do
        local out = H.sh(("timeout 20 redis-cli -p %d INFO server 2>&1"):format(port))
        local which = tonumber(out:match("tcp_port:(%d+)"))
        served[which or "none"] = (served[which or "none"] or 0) + 1
      end
      H.stop(r2, "KILL")    -- the heavier server goes away
      local answers = {}
      for i = 1, 4 do
        answers[i] = (H.sh(("timeout 20 redis-cli -p %d PING 2>&1"):format(port))):gsub("%s+$", "")
      end
      local log = H.stop_sluice(p)
      -- Each worker takes its own turns, 1:2, so both servers answered and
      -- the heavier one at least as often.
      assert.is_nil(served.none, log)
      assert.is_true((served[r1.port] or 0) >= 1 and (served[r2.port] or 0) >= (served[r1.port] or 0),
                     ("%d: %s, %d: %s"):format(r1.port, tostring(served[r1.port]), r2.port, tostring(served[r2.port])))
      assert.are.same({ "PONG", "PONG", "PONG", "PONG" }, answers, log)
    end)
  end)

  describe("chosen by a Lua stage with ctx:connect", function()
    it("route by the client's first byte to an upstream name or an address", function()
      local a, b = peer("A"), peer("B")
      local port = H.free_port()
      local p = H.start_sluice(([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { { "spec.fixtures.upstream.router",
                                 routes = { a = "alpha", b = "127.0.0.1:%d", z = "db_internal:80" } } } } },
  upstreams = { alpha = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, b.port, a.port))
      local out_a = H.exchange(port, "a1", 10)
      local out_b = H.exchange(port, "b2", 10)
      local out_a2 = H.exchange(port, "a3", 10)
      local out_z = H.exchange(port, "z4", 10)
      local out_q = H.exchange(port, "q5", 10)
      local log = H.stop_sluice(p)
      assert.are.equal("Aa1", out_a)
      assert.are.equal("Bb2", out_b)
      assert.are.equal("Aa3", out_a2)
      assert.are.equal("", out_z)
      assert.are.equal("", out_q)
      assert.matches('routed "b" to 127.0.0.1:' .. b.port, log, 1, true)
      assert.matches('no route for "z": expected the name of an upstream or "host:port" (a numeric '
                     .. 'IPv4 host, an IPv6 host in brackets or a host name)', log, 1, true)
      assert.matches('no route for "q": expected the name of an upstream or "host:port"', log, 1, true)
      assert.matches("upstream 127.0.0.1:" .. b.port .. " for front closed", log, 1, true)
    end)

    it("override the listener's upstream in channel_active", function()
      local a, b = peer("A"), peer("B")
      local port = H.free_port()
      local p = H.start_sluice(([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "alpha",
                  pipeline = { { "spec.fixtures.upstream.pick", target = "beta" } } } },
  upstreams = { alpha = { servers = { "127.0.0.1:%d" } }, beta = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, a.port, b.port))
      local out = H.exchange(port, "x", 10)
      local log = H.stop_sluice(p)
      assert.are.equal("Bx", out)
      assert.matches("second connect: nil, already connected to an upstream", log, 1, true)
    end)

    it("raise on a target that is not a string: that connection closes, not the process", function()
      local port = H.free_port()
      local p = H.start_sluice(([[
return { listeners = { { name = "front", listen = "127.0.0.1:%d",
                         pipeline = { "spec.fixtures.upstream.pick" } } } }
]]):format(port))
      local out = H.exchange(port, "x", 10)
      local log = H.stop_sluice(p)
      assert.are.equal("", out)
      assert.matches("stage spec.fixtures.upstream.pick raised in channel_active on client 127.0.0.1:%d+ on "
                     .. "front: [^\n]*bad argument to connect %(string expected, got nil%)", log)
      assert.matches("closed: stage spec.fixtures.upstream.pick failed", log, 1, true)
    end)

    it("close the client with upstream_unavailable when the chosen address refuses", function()
      local dead = H.free_port()
      local port = H.free_port()
      local p = H.start_sluice(([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { { "spec.fixtures.upstream.pick", target = "127.0.0.1:%d" } } } },
}
]]):format(port, dead))
      local out, rc = H.exchange(port, "x", 10)
      local log = H.stop_sluice(p)
      assert.are.equal(0, rc)
      assert.are.equal("", out)
      assert.matches("on front: upstream unavailable after 1 try: 127.0.0.1:" .. dead .. " (Connection refused)",
                     log, 1, true)
      assert.matches("on front closed: upstream_unavailable", log, 1, true)
    end)
  end)
end)
