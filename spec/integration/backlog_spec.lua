-- A listener's backlog (the listen(2) queue), through the real binary: the
-- kernel's own view of the listening sockets (ss) says what sluice asked.
local H = require("helpers")

-- The backlog of every socket listening on 127.0.0.1:port, as ss shows it
-- (Send-Q of a listening socket), sorted.
local function backlogs(port)
  local out = H.sh(("ss -Hltn 'sport = :%d'"):format(port))
  local list = {}
  for line in out:gmatch("[^\n]+") do
    local sendq = line:match("^%S+%s+%d+%s+(%d+)")
    list[#list + 1] = tonumber(sendq)
  end
  table.sort(list)
  return list
end

local function config(port, peer, backlog)
  return ([[
return {
  workers = 2,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back", %s } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, backlog and ("backlog = %d"):format(backlog) or "", peer)
end

describe("backlog", function()
  local peers = H.killed_after_each()

  it("is 511 by default, given to every worker's socket, and changed by a reload in place",
    function()
      local peer = H.start_echo()
      peers[#peers + 1] = peer
      local port = H.free_port()
      local p = H.start_sluice(config(port, peer.port))
      assert.are.same({ 511, 511 }, backlogs(port))
      local cfg = assert(io.open(p.config, "w"))
      cfg:write(config(port, peer.port, 37))
      cfg:close()
      H.sh("kill -HUP " .. p.pid)
      assert.is_truthy(H.wait_for(function()
        return H.read(p.log):find("configuration reloaded", 1, true)
      end, 10), H.read(p.log))
      -- The same sockets (nothing queued is lost), with the new length.
      assert.are.same({ 37, 37 }, backlogs(port))
      assert.are.equal("ping", (H.exchange(port, "ping", 10)))
      H.stop_sluice(p)
    end)

  it("is refused outside 1..65535 with the key's name", function()
    local cfg = H.tmpfile("bad.lua", config(H.free_port(), 1, 70000))
    local out, rc = H.sh(("SLUICE_ROOT=%s %s %s --check %s 2>&1"):format(H.shq(H.root), H.wrapper,
                                                                      H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc, out)
    assert.matches("config error: listeners[1].backlog: expected an integer from 1 to 65535, got 70000",
                   out, 1, true)
  end)
end)
