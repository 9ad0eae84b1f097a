-- Per-server upstream metrics and the /upstreams view through the real
-- binary: socat backends that answer their name then echo, on 127.0.0.1.
-- Every count is compared with what the spec sent and received; every wait
-- is bounded, and no figure depends on timing.
local H = require("helpers")
local json = require("dkjson")

local get = H.admin_get

local function metrics(admin) return select(3, get(admin, "/metrics")) end

local function upstreams(admin)
  local status, head, body = get(admin, "/upstreams")
  assert.are.equal(200, status)
  assert.matches("Content-Type: application/json", head, 1, true)
  local doc, _, err = json.decode(body)
  assert(doc, ("not JSON (%s): %s"):format(tostring(err), body))
  return doc
end

local sample = H.sample

local function server_labels(port, extra)
  return ('upstream="back",server="127.0.0.1:%d"%s'):format(port, extra or "")
end

local function srv(text, name, port, extra)
  return sample(text, "sluice_upstream_server_" .. name, server_labels(port, extra))
end

-- The server entry of /upstreams for upstream "back" and port (nil: absent).
local function server_of(doc, port)
  for _, u in ipairs(doc.upstreams) do
    if u.name == "back" then
      for _, s in ipairs(u.servers) do
        if s.address == "127.0.0.1:" .. port then return s, u end
      end
    end
  end
  return nil
end

-- A client that sends `first`, then waits for the file `go` before it
-- half-closes. Returns it with release() and finish() (its exit status).
local function held_client(port, first)
  local go = H.tmpfile("go")
  local out = H.tmpfile("held.out", "")
  local script = ("printf %s; while [ ! -e %s ]; do sleep 0.02; done"):format(H.shq(first), H.shq(go))
  local p = H.spawn(("sh -c %s"):format(H.shq(("(%s) | socat -t 10 - TCP:127.0.0.1:%d > %s")
    :format(script, port, H.shq(out)))), "held")
  return { out = out,
           release = function() H.sh("touch " .. H.shq(go)) end,
           finish = function() return H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 20) end }
end

local function config(workers, admin, port, servers, extra)
  local list = {}
  for i, s in ipairs(servers) do list[i] = ('"127.0.0.1:%d"'):format(s) end
  return ([[
return {
  workers = %d,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { %s }%s } },
}
]]):format(workers, admin, port, table.concat(list, ", "), extra and (", " .. extra) or "")
end

describe("per-server upstream metrics", function()
  local peers = H.killed_after_each()
  local function peer(name, port)
    local p = H.start_peer("printf " .. name .. "; cat", port)
    peers[#peers + 1] = p
    return p
  end

  -- Sends each payload on a connection of its own; adds what went to and
  -- came from each server (by the name its reply starts with) to sent/got.
  -- Returns the names, in order.
  local function traffic(port, payloads, sent, got)
    local names = {}
    for i, data in ipairs(payloads) do
      local out, rc = H.exchange(port, data, 10)
      assert.are.equal(0, rc)
      local who = out:sub(1, 1)
      assert.are.equal(who .. data, out)
      sent[who] = (sent[who] or 0) + #data
      got[who] = (got[who] or 0) + #out
      names[i] = who
    end
    return names
  end

  it("count connections, bytes, failures and the down state of each server, as sent", function()
    local a, b = peer("A"), peer("B")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(1, admin, port, { a.port, b.port }, "fail_timeout_ms = 60000"))
    local text = metrics(admin)
    assert.are.equal(0, srv(text, "connections_total", a.port))
    assert.are.equal(1, srv(text, "up", a.port))
    assert.matches("# TYPE sluice_upstream_server_connect_seconds histogram", text, 1, true)

    -- Four connections of different sizes: round robin gives each server two.
    local sent, got = {}, {}
    traffic(port, { ("a"):rep(100), ("b"):rep(2000), ("c"):rep(30), ("d"):rep(4096) }, sent, got)
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    for name, s in pairs({ A = a, B = b }) do
      assert.are.equal(2, srv(text, "connections_total", s.port), text)
      assert.are.equal(0, srv(text, "connections_open", s.port))
      assert.are.equal(sent[name], srv(text, "sent_bytes_total", s.port))
      assert.are.equal(got[name], srv(text, "received_bytes_total", s.port))
      assert.are.equal(2, srv(text, "connect_seconds_count", s.port))
      assert.are.equal(2, srv(text, "connect_seconds_bucket", s.port, ',le="+Inf"'))
      assert.are.equal(0, srv(text, "connect_failures_total", s.port, ',reason="refused"'))
      assert.are.equal(0, srv(text, "marked_down_total", s.port, ',cause="passive"'))
      assert.are.equal(1, srv(text, "up", s.port))
    end
    -- The upstream's own series: the sum over its servers.
    assert.are.equal(4, sample(text, "sluice_upstream_connects_total", 'upstream="back"'))

    -- A stops: the next connect to it is refused and retried on B, and A
    -- is skipped from then on.
    H.stop(a, "KILL")
    assert.is_false(H.port_open(a.port))
    local sent_a = sent.A
    assert.are.same({ "B", "B", "B" }, traffic(port, { ("e"):rep(10), ("f"):rep(20), ("g"):rep(30) }, sent, got))
    assert.are.equal(sent_a, sent.A)
    -- A client held open on B, with its first bytes echoed.
    local c = held_client(port, "held!")
    assert.truthy(H.wait_for(function() return H.read(c.out) == "Bheld!" end, 10))
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return srv(text, "connections_open", b.port) == 1 and srv(text, "received_bytes_total", b.port) == got.B + 6
    end, 10), text)
    assert.are.equal(2, srv(text, "connections_total", a.port))
    assert.are.equal(1, srv(text, "connect_failures_total", a.port, ',reason="refused"'))
    assert.are.equal(0, srv(text, "connect_failures_total", a.port, ',reason="timeout"'))
    assert.are.equal(0, srv(text, "connect_failures_total", a.port, ',reason="other"'))
    assert.are.equal(1, srv(text, "marked_down_total", a.port, ',cause="passive"'))
    assert.are.equal(0, srv(text, "marked_down_total", a.port, ',cause="health_check"'))
    assert.are.equal(0, srv(text, "up", a.port))
    assert.are.equal(1, srv(text, "up", b.port))
    assert.are.equal(sent.A, srv(text, "sent_bytes_total", a.port))
    assert.are.equal(got.A, srv(text, "received_bytes_total", a.port))
    assert.are.equal(6, srv(text, "connections_total", b.port))   -- 2 + 3 + the held one
    assert.are.equal(sent.B + 5, srv(text, "sent_bytes_total", b.port))
    assert.are.equal(1, sample(text, "sluice_upstream_connect_failures_total", 'upstream="back"'))

    local doc = upstreams(admin)
    assert.are.equal(1, doc.workers)
    local sa, up = server_of(doc, a.port)
    assert.are.equal("round_robin", up.balance)
    assert.is_false(up.retired)
    assert.are.equal("down", sa.state)
    assert.are.equal(1, #sa.down)
    assert.are.equal(0, sa.down[1].worker)
    assert.are.equal("passive", sa.down[1].cause)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", sa.down[1]["until"])
    assert.is_true(sa.down[1].remaining_ms > 0 and sa.down[1].remaining_ms <= 60000)
    assert.are.same({ refused = 1, timeout = 0, other = 0, tls = 0 }, sa.failures)
    assert.are.same({ passive = 1, health_check = 0 }, sa.marked_down)
    assert.are.equal(2, sa.connections)
    assert.are.equal(0, sa.active)
    assert.are.equal(sent.A, sa.sent_bytes)
    assert.are.equal(got.A, sa.received_bytes)
    local sb = server_of(doc, b.port)
    assert.are.equal("up", sb.state)
    assert.are.same({}, sb.down)
    assert.are.equal(1, sb.active)
    assert.are.equal(6, sb.connections)
    assert.are.equal(1, sb.weight)
    assert.are.equal(a.port, tonumber(up.servers[1].address:match(":(%d+)$")))  -- configuration order

    c.release()
    assert.are.equal(0, c.finish())
    assert.truthy(H.wait_for(function()
      return srv(metrics(admin), "connections_open", b.port) == 0
    end, 10))
    text = metrics(admin)
    assert.are.equal(sent.B + 5, srv(text, "sent_bytes_total", b.port))
    assert.are.equal(got.B + 6, srv(text, "received_bytes_total", b.port))
    H.stop_sluice(p)
  end)

  it("sum the servers over workers", function()
    local a, b = peer("A"), peer("B")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(2, admin, port, { a.port, b.port }))
    local sent, got = {}, {}
    local payloads = {}
    for i = 1, 10 do payloads[i] = ("z"):rep(50 * i) end
    traffic(port, payloads, sent, got)
    local text
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    local total = 0
    for name, s in pairs({ A = a, B = b }) do
      local n = srv(text, "connections_total", s.port)
      total = total + n
      assert.are.equal(sent[name] or 0, srv(text, "sent_bytes_total", s.port))
      assert.are.equal(got[name] or 0, srv(text, "received_bytes_total", s.port))
      assert.are.equal(n, srv(text, "connect_seconds_count", s.port))
    end
    assert.are.equal(10, total)
    assert.are.equal(10, sample(text, "sluice_upstream_connects_total", 'upstream="back"'))
    local doc = upstreams(admin)
    assert.are.equal(2, doc.workers)
    assert.are.equal(2, doc.workers_answering)
    assert.are.equal(10, server_of(doc, a.port).connections + server_of(doc, b.port).connections)
    H.stop_sluice(p)
  end)

  it("count a connect that times out, and a server a health check holds down", function()
    local hole, close_hole = H.blackhole()
    local dead = H.free_port()
    local b = peer("B")
    local port, admin = H.free_port(), H.free_port()
    -- Passive marks off: the health checks alone hold dead down.
    local p = H.start_sluice(config(1, admin, port, { hole, dead, b.port },
      "connect_timeout_ms = 300, max_fails = 0, " ..
      "health_check = { interval_ms = 60000, timeout_ms = 60000, fails = 1 }"))
    local text
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return srv(text, "marked_down_total", dead, ',cause="health_check"') == 1
    end, 10), text)
    assert.are.equal(0, srv(text, "up", dead))
    assert.are.equal(0, srv(text, "connect_failures_total", dead, ',reason="refused"'))
    -- The first client tries the hole (round robin's first), waits for its
    -- timeout, and gets B; dead is skipped.
    assert.are.equal("Bx", (H.exchange(port, "x", 10)))
    text = metrics(admin)
    close_hole()
    assert.are.equal(1, srv(text, "connect_failures_total", hole, ',reason="timeout"'), text)
    assert.are.equal(0, srv(text, "connections_total", hole))
    assert.are.equal(0, srv(text, "marked_down_total", hole, ',cause="passive"'))
    assert.are.equal(1, srv(text, "up", hole))
    assert.are.equal(1, srv(text, "connections_total", b.port))
    local sd = server_of(upstreams(admin), dead)
    assert.are.equal("down", sd.state)
    assert.are.same({ { worker = 0, cause = "health_check" } }, sd.down)
    H.stop_sluice(p)
  end)

  it("keep a removed server's series while a connection of the old configuration uses it", function()
    local a, b = peer("A"), peer("B")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(1, admin, port, { a.port }))
    local c = held_client(port, "old")
    assert.truthy(H.wait_for(function() return H.read(c.out) == "Aold" end, 10))
    local f = assert(io.open(p.config, "w"))
    f:write(config(1, admin, port, { b.port }))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.equal("Bnew", (H.exchange(port, "new", 10)))
    local text = metrics(admin)
    assert.are.equal(1, srv(text, "connections_open", a.port))
    assert.are.equal(1, srv(text, "connections_total", b.port))
    local doc = upstreams(admin)
    local sa, up = server_of(doc, a.port)
    assert.is_true(sa.retired)
    assert.are.equal(1, sa.active)
    assert.is_false(up.retired)
    assert.is_false(server_of(doc, b.port).retired)
    assert.are.equal(b.port, tonumber(up.servers[1].address:match(":(%d+)$")))  -- current first
    -- The old connection closes: A's series go once the old configuration
    -- is released; the upstream's own series stay.
    c.release()
    assert.are.equal(0, c.finish())
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return srv(text, "connections_total", a.port) == nil
    end, 10), text)
    assert.is_nil(srv(text, "sent_bytes_total", a.port))
    assert.are.equal(1, srv(text, "connections_total", b.port))
    assert.are.equal(2, sample(text, "sluice_upstream_connects_total", 'upstream="back"'))
    assert.is_nil(server_of(upstreams(admin), a.port))
    H.stop_sluice(p)
  end)

  -- The upstream's own series of name ("sent_bytes_total", ...).
  local function up(text, name, upstream)
    return sample(text, "sluice_upstream_" .. name, ('upstream="%s"'):format(upstream or "back"))
  end

  -- Writes cfg over p's configuration, sends SIGHUP and waits for the
  -- reload's line (the n-th of the log).
  local function reload(p, cfg, n)
    local f = assert(io.open(p.config, "w"))
    f:write(cfg)
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.truthy(H.wait_for(function()
      local _, k = H.read(p.log):gsub("configuration reloaded", "")
      return k >= n
    end, 10), H.read(p.log))
  end

  local UPSTREAM_SERIES = { "connects_total", "connect_failures_total", "connect_seconds_count",
                            "sent_bytes_total", "received_bytes_total", "tls_resumed_total",
                            "connections_open" }

  local function upstream_row(text)
    local row = {}
    for _, name in ipairs(UPSTREAM_SERIES) do row[name] = up(text, name) end
    return row
  end

  it("add up an upstream's servers into its own series, across reloads", function()
    local a, b = peer("A"), peer("B")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(2, admin, port, { a.port, b.port }))
    local text = metrics(admin)
    for _, name in ipairs(UPSTREAM_SERIES) do assert.are.equal(0, up(text, name), name) end
    local sent, got = {}, {}
    local payloads = {}
    for i = 1, 8 do payloads[i] = ("u"):rep(37 * i) end
    traffic(port, payloads, sent, got)
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    local total_sent, total_got = (sent.A or 0) + (sent.B or 0), (got.A or 0) + (got.B or 0)
    assert.are.equal(37 * 36, total_sent)
    -- The upstream's row is the sum of its servers' rows, and what the spec sent.
    assert.are.equal(total_sent, up(text, "sent_bytes_total"), text)
    assert.are.equal(total_sent, srv(text, "sent_bytes_total", a.port) + srv(text, "sent_bytes_total", b.port))
    assert.are.equal(total_got, up(text, "received_bytes_total"))
    assert.are.equal(total_got, srv(text, "received_bytes_total", a.port) + srv(text, "received_bytes_total", b.port))
    assert.are.equal(8, up(text, "connects_total"))
    assert.are.equal(8, srv(text, "connections_total", a.port) + srv(text, "connections_total", b.port))
    assert.are.equal(0, up(text, "connections_open"))

    -- A connection held open counts at once: open, and its bytes so far.
    local c = held_client(port, "held!")
    assert.truthy(H.wait_for(function() return #H.read(c.out) == 6 end, 10))
    local who = H.read(c.out):sub(1, 1)
    sent[who], got[who] = sent[who] + 5, got[who] + 6
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return up(text, "received_bytes_total") == total_got + 6
    end, 10), text)
    assert.are.equal(1, up(text, "connections_open"))
    assert.are.equal(total_sent + 5, up(text, "sent_bytes_total"))
    c.release()
    assert.are.equal(0, c.finish())
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return up(text, "connections_open") == 0
    end, 10), text)
    local before = upstream_row(text)
    local b_sent, b_got = srv(text, "sent_bytes_total", b.port), srv(text, "received_bytes_total", b.port)
    assert.are.equal(sent.B, b_sent)

    -- B is removed: its series go, the upstream's keep what it counted.
    reload(p, config(2, admin, port, { a.port }), 1)
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return srv(text, "connections_total", b.port) == nil
    end, 10), text)
    assert.are.same(before, upstream_row(text))
    assert.are.equal(srv(text, "sent_bytes_total", a.port) + b_sent, up(text, "sent_bytes_total"))
    assert.are.equal(srv(text, "received_bytes_total", a.port) + b_got, up(text, "received_bytes_total"))
    -- New traffic goes to A and adds to both.
    assert.are.same({ "A", "A" }, traffic(port, { ("v"):rep(11), ("w"):rep(13) }, sent, got))
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    assert.are.equal(before.sent_bytes_total + 24, up(text, "sent_bytes_total"))
    assert.are.equal(before.received_bytes_total + 26, up(text, "received_bytes_total"))
    assert.are.equal(before.connects_total + 2, up(text, "connects_total"))
    assert.are.equal(sent.A, srv(text, "sent_bytes_total", a.port))
    assert.are.equal(sent.A + sent.B, up(text, "sent_bytes_total"))
    local after = upstream_row(text)

    -- B comes back: its series start from zero, the upstream's go on.
    reload(p, config(2, admin, port, { a.port, b.port }), 2)
    text = metrics(admin)
    assert.are.equal(0, srv(text, "sent_bytes_total", b.port), text)
    assert.are.same(after, upstream_row(text))
    local doc = upstreams(admin)
    local _, u = server_of(doc, a.port)
    assert.are.equal(after.sent_bytes_total, u.sent_bytes)
    assert.are.equal(after.received_bytes_total, u.received_bytes)
    assert.are.equal(after.connects_total, u.connections)
    assert.are.equal(0, u.active)
    assert.are.same({ refused = 0, timeout = 0, other = 0, tls = 0 }, u.failures)
    H.stop_sluice(p)
  end)

  local function router_config(workers, admin, port)
    return ([[
return {
  workers = %d,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { "spec.fixtures.upstream.line_router" } } },
}
]]):format(workers, admin, port)
  end

  local function direct(text, name, server, extra)
    return sample(text, "sluice_upstream_server_" .. name,
                  ('upstream="(direct)",server="%s"%s'):format(server, extra or ""))
  end

  it("count ctx:connect to a plain address as a server of (direct)", function()
    local a, b = peer("A"), peer("B")
    local dead = H.free_port()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(router_config(1, admin, port))
    local sent, got = {}, {}
    local function send(target, data, who)
      local input = target .. "\n" .. data
      local out, rc = H.exchange(port, input, 10)
      assert.are.equal(0, rc)
      assert.are.equal(who .. input, out)
      sent[who] = (sent[who] or 0) + #input
      got[who] = (got[who] or 0) + #out
    end
    send("127.0.0.1:" .. a.port, ("1"):rep(100), "A")
    send("127.0.0.1:" .. b.port, ("2"):rep(2000), "B")
    send("localhost:" .. a.port, ("3"):rep(10), "A")   -- the same address
    assert.are.equal("", (H.exchange(port, "127.0.0.1:" .. dead .. "\nlost", 10)))
    local text
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    local sa, sb = "127.0.0.1:" .. a.port, "127.0.0.1:" .. b.port
    assert.are.equal(2, direct(text, "connections_total", sa), text)
    assert.are.equal(1, direct(text, "connections_total", sb))
    assert.are.equal(0, direct(text, "connections_open", sa))
    assert.are.equal(sent.A, direct(text, "sent_bytes_total", sa))
    assert.are.equal(got.A, direct(text, "received_bytes_total", sa))
    assert.are.equal(sent.B, direct(text, "sent_bytes_total", sb))
    assert.are.equal(got.B, direct(text, "received_bytes_total", sb))
    assert.are.equal(2, direct(text, "connect_seconds_count", sa))
    assert.are.equal(2, direct(text, "connect_seconds_bucket", sa, ',le="+Inf"'))
    local sd = "127.0.0.1:" .. dead
    assert.are.equal(1, direct(text, "connect_failures_total", sd, ',reason="refused"'))
    assert.are.equal(0, direct(text, "connect_failures_total", sd, ',reason="timeout"'))
    assert.are.equal(0, direct(text, "connections_total", sd))
    assert.are.equal(0, direct(text, "sent_bytes_total", sd))
    -- No state, role or TLS for an address.
    assert.is_nil(direct(text, "up", sa))
    assert.is_nil(direct(text, "backup", sa))
    -- The upstream's row: the sum.
    assert.are.equal(3, up(text, "connects_total", "(direct)"))
    assert.are.equal(1, up(text, "connect_failures_total", "(direct)"))
    assert.are.equal(sent.A + sent.B, up(text, "sent_bytes_total", "(direct)"))
    assert.are.equal(got.A + got.B, up(text, "received_bytes_total", "(direct)"))
    assert.are.equal(0, up(text, "connections_open", "(direct)"))

    local doc = upstreams(admin)
    local d
    for _, u in ipairs(doc.upstreams) do if u.name == "(direct)" then d = u end end
    assert.truthy(d, json.encode(doc))
    assert.is_nil(d.balance)
    assert.are.equal(3, d.connections)
    assert.are.equal(sent.A + sent.B, d.sent_bytes)
    assert.are.same({ refused = 1, timeout = 0, other = 0, tls = 0 }, d.failures)
    local by = {}
    for _, s in ipairs(d.servers) do by[s.address] = s end
    assert.are.equal(sent.A, by[sa].sent_bytes)
    assert.are.equal(got.B, by[sb].received_bytes)
    assert.are.equal(1, by[sd].failures.refused)
    assert.is_nil(by[sa].state)
    H.stop_sluice(p)
  end)

  it("track at most 256 addresses of ctx:connect per worker, the rest as other", function()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(router_config(1, admin, port))
    -- 257 listeners of the spec's own: the connects complete in their
    -- accept queues, and the spec reads each connection's bytes.
    local listeners, sent = {}, {}
    local ok, err = pcall(function()
      for i = 1, 257 do
        local L = H.raw_listener()
        listeners[i] = L
        local input = ("127.0.0.1:%d\n%s"):format(L.port, ("y"):rep(i))
        local c = H.connect(port)
        c.send(input)
        local fd = assert(L.accept(10), "no connection from sluice")
        local have = ""
        while #have < #input do
          local more = L.read(fd, 10)
          assert(more and #more > 0, "short read: " .. have)
          have = have .. more
        end
        assert.are.equal(input, have)
        sent[i] = #input
        L.reset(fd)
        c.close()
      end
    end)
    for _, L in ipairs(listeners) do L.close() end
    assert(ok, err)
    local text
    assert.truthy(H.wait_for(function()
      text = metrics(admin)
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
         and up(text, "connections_open", "(direct)") == 0
    end, 10), text)
    local rows, total = 0, 0
    for server, v in text:gmatch('sluice_upstream_server_sent_bytes_total{upstream="%(direct%)",server="([^"]+)"} (%d+)') do
      rows = rows + 1
      total = total + tonumber(v)
      assert.truthy(server == "other" or server:match("^127%.0%.0%.1:%d+$"), server)
    end
    assert.are.equal(257, rows)   -- 256 addresses and other
    for i = 1, 256 do
      local s = "127.0.0.1:" .. listeners[i].port
      assert.are.equal(sent[i], direct(text, "sent_bytes_total", s), s)
      assert.are.equal(1, direct(text, "connections_total", s))
    end
    assert.is_nil(direct(text, "sent_bytes_total", "127.0.0.1:" .. listeners[257].port))
    assert.are.equal(sent[257], direct(text, "sent_bytes_total", "other"))
    assert.are.equal(1, direct(text, "connections_total", "other"))
    local all = 0
    for i = 1, 257 do all = all + sent[i] end
    assert.are.equal(all, total)
    assert.are.equal(all, up(text, "sent_bytes_total", "(direct)"))
    assert.are.equal(257, up(text, "connects_total", "(direct)"))
    H.stop_sluice(p)
  end)
end)
