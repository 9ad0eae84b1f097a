-- The outbound queue's limit through the real binary: a stage that answers
-- each request with a large reply, whether or not the client reads, makes a
-- non-reading client's queue grow until outbound_limit closes it (and its
-- upstream), while another connection on the same listener carries on.
local H = require("helpers")

local client = H.connect

-- Answers every request line with 256 KiB and never asks whether the client
-- keeps up (ctx:is_writable()); passes the request on to the upstream. Logs
-- the first reply of each connection that was written, and the first that
-- failed for each reason (write promises).
local REPLY = 4 * 65536
local SERVER_STAGE = [[
local log = require("sluice.log")
local BLOCK = string.rep("x", 65536)
return {
  channel_read = function(ctx, buf)
    local _, lines = buf:tostring():gsub("\n", "\n")
    local seen, name = ctx.state, ctx:describe()
    for _ = 1, lines do
      for _ = 1, 3 do ctx:write(BLOCK, false) end
      ctx:write(BLOCK):on_complete(function(ok, err)
        local what = ok and "written" or ("failed: " .. err)
        if not seen[what] then
          seen[what] = true
          log.info("%s: a reply %s", name, what)
        end
      end)
      ctx:flush()
    end
    ctx:fire_read(buf)
  end,
}
]]

local function config(port, upstream_port, mod, extra)
  return ([[
return {
  drain_timeout_ms = 100,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back",
      pipeline = { %q }, %s },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, mod, extra or "", upstream_port)
end

describe("the outbound limit", function()
  local cleanup = {}
  after_each(function()
    for i = #cleanup, 1, -1 do cleanup[i]() end
    cleanup = {}
  end)

  it("closes a connection whose client does not read, and its upstream; others carry on", function()
    local stage = H.tmpfile("bulk_server.lua", SERVER_STAGE)
    local mod = stage:match("([^/]+)%.lua$")
    local up = H.raw_listener() -- accepts (through its backlog) and never reads
    cleanup[#cleanup + 1] = up.close
    local port = H.free_port()
    local p = H.start_sluice(config(port, up.port, mod, "outbound_limit = 1048576"))

    -- A client that reads its replies.
    local good = client(port)
    cleanup[#cleanup + 1] = good.close
    good.send("GET\n")
    assert.are.equal(REPLY, #good.recv(REPLY, 10))

    -- A client that sends 200 requests (50 MiB of replies) and reads nothing.
    local req = H.tmpfile("requests.txt", ("GET\n"):rep(200))
    local flood = H.spawn(("socat -u FILE:%s,ignoreeof TCP:127.0.0.1:%d"):format(H.shq(req), port),
                          "flood")
    cleanup[#cleanup + 1] = function() H.stop(flood, "KILL") end
    local closed = H.wait_for(function()
      return H.read(p.log):match("client 127%.0%.0%.1:%d+ on front closed: outbound_limit [^\n]*")
    end, 20)
    assert.is_truthy(closed, H.read(p.log))
    assert.matches("limit 1048576 B", closed, 1, true)

    -- The first client is still served.
    good.send("GET\nGET\n")
    assert.are.equal(2 * REPLY, #good.recv(2 * REPLY, 10))

    good.close()
    local log = H.stop_sluice(p) -- exit 0, pool clean, no leak
    assert.matches("upstream 127.0.0.1:" .. up.port .. " for front closed: peer closed: outbound_limit",
                   log, 1, true)
    -- The stage heard of it through its write promises: the flooded
    -- connection's queued replies failed with outbound_limit, the ones it
    -- wrote after the close with closed (the first ones, which the socket
    -- took, were written); the other connection's were all written.
    local flooded = closed:match("^(client 127%.0%.0%.1:%d+ on front)")
    assert.matches(flooded .. ": a reply failed: outbound_limit", log, 1, true)
    assert.matches(flooded .. ": a reply failed: closed", log, 1, true)
    local good_name
    for name in log:gmatch("(client 127%.0%.0%.1:%d+ on front): a reply written") do
      if name ~= flooded then good_name = name end
    end
    assert.is_truthy(good_name, log)
    assert.not_matches(good_name .. ": a reply failed", log, 1, true)
    -- What the flooded connection held never went far above the limit.
    local peak = tonumber(closed:match("peak queue (%d+) B"))
    assert.is_true(peak ~= nil and peak <= 1048576, "peak queue " .. tostring(peak))
  end)

  it("does not get in the way of the bridge's own backpressure", function()
    -- A slow upstream: the bridge keeps its queue near the high water mark,
    -- so a limit of four times that mark is never reached.
    local sink = H.tmpfile("sink.bin")
    local peer = H.start_peer("sleep 1; cat > " .. H.shq(sink) .. "; echo stored")
    cleanup[#cleanup + 1] = function() H.stop(peer, "KILL") end
    local port = H.free_port()
    local p = H.start_sluice(([[
return {
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  outbound_limit = 4194304 } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, peer.port))
    local input = H.tmpfile("bulk.bin")
    H.sh(("head -c %d /dev/urandom > %s"):format(8 * 1024 * 1024, H.shq(input)))
    local out, rc = H.exchange(port, { file = input }, 60)
    assert.are.equal(0, rc)
    assert.are.equal("stored\n", out)
    local function digest(path) return (H.sh("sha256sum < " .. H.shq(path))):match("^(%x+)") end
    assert.are.equal(digest(input), digest(sink))
    local log = H.stop_sluice(p)
    assert.not_matches("outbound_limit", log, 1, true)
  end)
end)
