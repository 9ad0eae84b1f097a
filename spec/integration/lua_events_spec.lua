-- The order in which a Lua stage's events arrive, through the real binary:
-- the same for a stage with an added callback (called as its pipeline is
-- built) and one without (whose context Lua learns of with its next
-- event), on connections that carry data, that fail to connect, and that
-- close before sending anything.
local H = require("helpers")

local STAGES = {
  plain = "spec.fixtures.stages.event_order",
  added = "spec.fixtures.stages.event_order_added",
}

-- "order" lines of the log, grouped by connection, in log order.
local function events_by_connection(log)
  local by, order = {}, {}
  for conn, what in log:gmatch("order (client [^:]+:%d+ on %w+): ([^\n]+)") do
    if not by[conn] then
      by[conn] = {}
      order[#order + 1] = conn
    end
    table.insert(by[conn], what)
  end
  return by, order
end

describe("Lua stage events", function()
  local peers = H.killed_after_each()

  for _, kind in ipairs({ "plain", "added" }) do
    describe(("a stage %s"):format(kind == "added" and "with an added callback"
                                   or "without an added callback"), function()
      local first = kind == "added" and { "added" } or {}
      local function expect(...)
        local t = {}
        for _, e in ipairs(first) do t[#t + 1] = e end
        for _, e in ipairs({ ... }) do t[#t + 1] = e end
        return t
      end

      it("gets added (if it has one), active, read, input_closed, inactive, removed in that order",
        function()
          local echo = H.start_echo()
          peers[#peers + 1] = echo
          local port = H.free_port()
          local p = H.start_sluice(([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { %q } } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, STAGES[kind], echo.port))
          local out, rc = H.exchange(port, "hello", 10)
          assert.are.equal(0, rc)
          assert.are.equal("hello", out)
          local log = H.stop_sluice(p)
          local by, order = events_by_connection(log)
          assert.are.equal(1, #order, log)
          assert.are.same(expect("active", "read 5", "user_event input_closed", "inactive",
                                 "removed"), by[order[1]])
        end)

      it("gets inactive and removed on a connection whose upstream refused it", function()
        local closed = H.free_port()   -- nothing listens there
        local port = H.free_port()
        local p = H.start_sluice(([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { %q } } },
  upstreams = { back = { servers = { "127.0.0.1:%d" }, tries = 1 } },
}
]]):format(port, STAGES[kind], closed))
        local c = H.connect(port)
        assert.are.equal("", c.recv(1, 10))   -- closed by sluice: upstream_unavailable
        c.close()
        assert.is_truthy(H.wait_for(function()
          return H.read(p.log):find(": removed", 1, true)
        end, 10), H.read(p.log))
        local log = H.stop_sluice(p)
        assert.matches("closed: upstream_unavailable", log, 1, true)
        local by, order = events_by_connection(log)
        assert.are.equal(1, #order, log)
        assert.are.same(expect("active", "inactive", "removed"), by[order[1]])
      end)

      it("gets every event of many short connections, each in order", function()
        local echo = H.start_echo()
        peers[#peers + 1] = echo
        local port = H.free_port()
        local p = H.start_sluice(([[
return {
  workers = 2,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { %q } } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, STAGES[kind], echo.port))
        -- Half of them close without sending anything.
        for i = 1, 20 do
          local c = H.connect(port)
          if i % 2 == 0 then
            c.send("ping")
            assert.are.equal("ping", c.recv(4, 10))
          end
          c.close()
        end
        assert.is_truthy(H.wait_for(function()
          local _, n = H.read(p.log):gsub(": removed", "")
          return n == 20
        end, 10), H.read(p.log))
        local log = H.stop_sluice(p)
        local by, order = events_by_connection(log)
        assert.are.equal(20, #order, log)
        local with_data = 0
        for _, conn in ipairs(order) do
          local ev = by[conn]
          if ev[#first + 2] == "read 4" then
            with_data = with_data + 1
            assert.are.same(expect("active", "read 4", "user_event input_closed", "inactive",
                                   "removed"), ev)
          else
            assert.are.same(expect("active", "user_event input_closed", "inactive", "removed"),
                            ev)
          end
        end
        assert.are.equal(10, with_data)
      end)
    end)
  end
end)
