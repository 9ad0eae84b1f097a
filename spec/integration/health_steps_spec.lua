-- Health checks in steps (health_check.steps): send, expect and
-- expect_regex in order, against real peers (redis-server primary and
-- replica, socat scripts), the read bound, and a regex that does not
-- compile. Every wait is bounded.
local H = require("helpers")

-- A config with one listener "front" on port and an upstream "back" of the
-- given server ports; up is the text of the upstream's other keys.
local function config(port, servers, up)
  local list = {}
  for i, s in ipairs(servers) do list[i] = ('"127.0.0.1:%d"'):format(s) end
  return ([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { %s }, %s } },
}
]]):format(port, table.concat(list, ", "), up)
end

-- Waits for the line saying server port is down, with its last reason.
local function down(p, port, why)
  local line = ("upstream back: server 127.0.0.1:%d is down (health check: 1 failed in a row, "
                .. "last: %s)"):format(port, why)
  return H.wait_for(function() return H.read(p.log):find(line, 1, true) end, 20)
end

describe("health check steps", function()
  local peers = H.killed_after_each()
  local function keep(p)
    peers[#peers + 1] = p
    return p
  end

  it("tell a redis primary from its replica with expect_regex, and send traffic to the primary only",
     function()
    -- Both keep their files (a full sync's dump) in the spec's folder.
    local dir = H.shq(H.tmpdir())
    local pport = H.free_port()
    local primary = keep(H.spawn(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no "
                                  .. "--dir %s"):format(pport, dir), "redis"))
    primary.port = pport
    assert(H.wait_for(function()
      return (H.sh(("redis-cli -p %d PING 2>/dev/null"):format(pport))):find("PONG", 1, true)
    end, 10), "redis-server did not start:\n" .. H.read(primary.log))
    local rport = H.free_port()
    local replica = keep(H.spawn(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no "
                                  .. "--dir %s --replicaof 127.0.0.1 %d"):format(rport, dir, primary.port),
                                 "replica"))
    assert(H.wait_for(function()
      return (H.sh(("redis-cli -p %d INFO replication 2>/dev/null"):format(rport))):find("role:slave", 1, true)
    end, 10), "the replica did not start:\n" .. H.read(replica.log))
    local port = H.free_port()
    local p = H.start_sluice(config(port, { primary.port, rport }, [[max_fails = 0, tries = 1,
      health_check = { interval_ms = 2500, timeout_ms = 2000, fails = 1, passes = 1, steps = {
        { send = "PING\r\n" }, { expect = "+PONG" },
        { send = "INFO replication\r\n" }, { expect_regex = "^role:master" } } }]]))
    -- The replica answers INFO with role:slave and keeps the connection
    -- open: the fourth step waits until the timeout.
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find(("server 127.0.0.1:%d is down %%(health check: 1 failed in a row, last: "
                                 .. "step 4: expected /%%^role:master/ not found in %%d+ bytes read "
                                 .. "%%(timed out%%)%%)"):format(rport))
    end, 20), H.read(p.log))
    -- Writes go through sluice: a replica would answer -READONLY.
    for i = 1, 6 do
      local out, rc = H.sh(("redis-cli -p %d SET k%d v%d"):format(port, i, i))
      assert.are.equal(0, rc)
      assert.are.equal("OK\n", out)
    end
    assert.are.equal("v6\n", (H.sh(("redis-cli -p %d GET k6"):format(primary.port))))
    local log = H.stop_sluice(p)
    assert.not_matches("server 127.0.0.1:" .. primary.port .. " is down", log, 1, true)
    assert.not_matches("health check of 127.0.0.1:" .. primary.port, log, 1, true)
  end)

  it("name the step that failed: the second expect of a greeting protocol", function()
    -- Both greet, read a line, and answer: one "OK-" and the line, one "BYE".
    local good = keep(H.start_peer("echo HELLO-v1; read l; echo OK-$l"))
    local bad = keep(H.start_peer("echo HELLO-v1; read l; echo BYE"))
    local port = H.free_port()
    local p = H.start_sluice(config(port, { good.port, bad.port }, [[max_fails = 0, tries = 1,
      health_check = { interval_ms = 2500, timeout_ms = 2000, fails = 1, passes = 1, steps = {
        { expect_regex = "^HELLO-v[0-9]+$" }, { send = "PING\n" }, { expect = "OK-PING" } } }]]))
    -- After step 1's match ("HELLO-v1"), the window holds "\n" and "BYE\n".
    assert.is_truthy(down(p, bad.port, 'step 3: expected "OK-PING" not found in 5 bytes read '
                                       .. "(the server closed)"), H.read(p.log))
    for i = 1, 4 do
      assert.are.equal("HELLO-v1\nOK-x" .. i .. "\n", H.exchange(port, "x" .. i .. "\n", 10))
    end
    local log = H.stop_sluice(p)
    assert.not_matches("server 127.0.0.1:" .. good.port .. " is down", log, 1, true)
  end)

  it("fail a server that streams without end at the read bound, and log each failure before down",
     function()
    -- It streams once it has read a line (a port probe sends none).
    local endless = keep(H.start_peer("read l && exec yes"))
    local quiet = keep(H.start_named_peer("A"))
    local port = H.free_port()
    local p = H.start_sluice(config(port, { quiet.port, endless.port }, [[max_fails = 0, tries = 1,
      health_check = { interval_ms = 2000, timeout_ms = 2000, fails = 2, passes = 1,
        steps = { { send = "go\n" }, { expect = "never" } } }]]))
    local why = 'step 2: expected "never" not found in 16384 bytes read (the read limit of 16384 '
                .. "bytes per check)"
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find(("upstream back: server 127.0.0.1:%d is down (health check: 2 failed "
                                 .. "in a row, last: %s)"):format(endless.port, why), 1, true)
    end, 20), H.read(p.log))
    local log = H.read(p.log)
    assert.is_truthy(log:find(("upstream back: health check of 127.0.0.1:%d failed (1 of 2 in a row): %s")
                              :format(endless.port, why), 1, true), log)
    -- The named peer sends "A" only: its check times out in step 2.
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find(('health check of 127.0.0.1:%d failed (1 of 2 in a row): step 2: expected '
                                 .. '"never" not found in 4 bytes read (timed out)'):format(quiet.port), 1, true)
    end, 20), H.read(p.log))
    H.stop_sluice(p)
  end)

  it("refuse a regex that does not compile, naming the key and the reason (exit 2)", function()
    local cfg = H.tmpfile("bad_regex.lua", config(1, { 2 }, [[
      health_check = { steps = { { send = "x" }, { expect_regex = "role:(master" } } }]]))
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal("config error: upstreams.back.health_check.steps[2].expect_regex: expected a "
                     .. "POSIX extended regular expression, got an invalid one (Unmatched ( or \\()\n", out)
  end)
end)
