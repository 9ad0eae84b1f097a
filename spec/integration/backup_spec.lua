-- Backup servers through the real binary: two primaries and a backup, all
-- socat peers on 127.0.0.1 that answer with their name, then echo. The
-- primaries are stopped and started again by PID; every wait is bounded and
-- no assertion depends on how long anything took.
local H = require("helpers")
local json = require("dkjson")

-- One worker (each worker balances on its own: exact counts need one), a
-- listener "front" on port, upstream "back" with primaries a and b and
-- backup c, an admin endpoint on admin.
local function config(port, admin, a, b, c, balance)
  return ([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:%d", { "127.0.0.1:%d", weight = 1 },
                                     { "127.0.0.1:%d", backup = true } },
                         balance = "%s", fail_timeout_ms = 200 } },
}
]]):format(admin, port, a, b, c, balance)
end

local function count_of(s, text)
  local n, from = 0, 1
  while true do
    local i = s:find(text, from, true)
    if not i then return n end
    n, from = n + 1, i + #text
  end
end

local function upstreams(admin)
  local status, _, body = H.admin_get(admin, "/upstreams")
  assert.are.equal(200, status)
  local doc, _, err = json.decode(body)
  assert(doc, ("not JSON (%s): %s"):format(tostring(err), body))
  local by_port = {}
  for _, s in ipairs(doc.upstreams[1].servers) do
    by_port[tonumber(s.address:match(":(%d+)$"))] = s
  end
  return by_port
end

describe("backup servers", function()
  local peers = H.killed_after_each()
  local function peer(name, port)
    local p = H.start_named_peer(name, port)
    peers[#peers + 1] = p
    return p
  end

  for _, balance in ipairs({ "round_robin", "least_conn", "hash", "random_two" }) do
    it("take connections only while no primary is available (" .. balance .. ")", function()
      local a, b, c = peer("A"), peer("B"), peer("C")
      local port, admin = H.free_port(), H.free_port()
      local p = H.start_sluice(config(port, admin, a.port, b.port, c.port, balance))

      -- Both primaries up: the backup gets nothing.
      local before, replies = H.spread(port, 6)
      assert.are.equal(6, (before.A or 0) + (before.B or 0), replies)
      assert.is_nil(before.C, replies)
      if balance == "round_robin" then
        assert.are.equal(3, before.A, replies)
      end
      local shown = upstreams(admin)
      assert.are.same({ false, false, true },
                      { shown[a.port].backup, shown[b.port].backup, shown[c.port].backup })
      local metrics = select(3, H.admin_get(admin, "/metrics"))
      local function backup_gauge(q)
        return H.sample(metrics, "sluice_upstream_server_backup",
                        ('upstream="back",server="127.0.0.1:%d"'):format(q))
      end
      assert.are.same({ 0, 0, 1 }, { backup_gauge(a.port), backup_gauge(b.port), backup_gauge(c.port) })

      -- Both primaries stop: every client is answered by the backup; the
      -- connects that find a primary gone are retried (tries = 3).
      H.stop(a, "KILL")
      H.stop(b, "KILL")
      assert.is_false(H.port_open(a.port))
      assert.is_false(H.port_open(b.port))
      local during, replies2 = H.spread(port, 6)
      assert.are.equal(6, during.C, replies2 .. "\n" .. H.read(p.log))

      -- A primary starts again: once its mark has run out (200 ms), new
      -- connections go back to it.
      peer("A", a.port)
      local back = H.wait_for(function() return H.exchange(port, "x", 10) == "Ax" end, 10)
      assert.is_truthy(back, H.read(p.log))
      local after, replies3 = H.spread(port, 4)
      local log = H.stop_sluice(p)
      assert.are.equal(4, after.A, replies3 .. "\n" .. log)
      assert.not_matches("upstream_unavailable", log, 1, true)
      -- Each switch is said once, however many connections it covered.
      assert.are.equal(1, count_of(log, ("worker 0: upstream back: no primary server available "
        .. "(down: 127.0.0.1:%d, 127.0.0.1:%d); new connections go to its backup servers")
        :format(a.port, b.port)), log)
      assert.are.equal(1, count_of(log, ("worker 0: upstream back: primary server 127.0.0.1:%d is "
        .. "available again; new connections go to its primary servers"):format(a.port)), log)
    end)
  end

  it("are not used while one primary is available, even with the other one refusing", function()
    -- One primary that refuses: each client's first try may find it, the
    -- retry goes to the primary that answers, never to the backup.
    local b, c = peer("B"), peer("C")
    local dead = H.free_port()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, dead, b.port, c.port, "round_robin"))
    local count, replies = H.spread(port, 8)
    local log = H.stop_sluice(p)
    assert.are.equal(8, count.B, replies .. "\n" .. log)
    assert.not_matches("backup servers", log, 1, true)
  end)
end)
