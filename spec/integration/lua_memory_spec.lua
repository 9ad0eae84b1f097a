-- lua_memory_limit through the real binary: a stage that keeps everything
-- its client sends hits the limit, that connection closes with "not enough
-- memory" and the stage named, every buffer comes back, and the next
-- connection is served; /memory and /metrics show the limit and the
-- refusals; a reload changes the limit.
local H = require("helpers")

local MiB = 1024 * 1024

-- Keeps a 256 KiB string per chunk for as long as its connection lives
-- (weak keys: a closed connection's strings become garbage).
local HOG = [[
local held = setmetatable({}, { __mode = "k" })
return {
  channel_read = function(ctx, buf)
    local t = held[ctx] or {}
    held[ctx] = t
    t[#t + 1] = string.rep("x", 256 * 1024) .. #t
    ctx:fire_read(buf)
  end,
}
]]

local function config(port, admin, echo_port, limit, mod)
  return ([[
return {
  workers = 1,
  lua_memory_limit = %d,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = { %q } },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
  admin = { listen = "127.0.0.1:%d" },
}
]]):format(limit, port, mod, echo_port, admin)
end

describe("lua_memory_limit", function()
  local peers = H.killed_after_each()

  it("closes the connection whose stage reaches it, and serves the next", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local mod = H.tmpfile("hog.lua", HOG):match("([^/]+)%.lua$")   -- beside the config
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port, 16 * MiB, mod))

    local _, _, body = H.admin_get(admin, "/memory")
    assert.matches("worker=0 bytes=%d+ limit=16777216 refused=0", body)

    -- 8 MiB in reads of at most 64 KiB: at least 128 chunks, 32 MiB kept.
    local input = H.tmpfile("big.bin")
    H.sh(("head -c %d /dev/zero > %s"):format(8 * MiB, H.shq(input)))
    local out = H.exchange(port, { file = input }, 30)
    assert.is_true(#out < 8 * MiB, tostring(#out))
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10))
    assert.is_true(H.metric(admin, "sluice_lua_memory_refusals_total", 'worker="0"') >= 1)
    local log = H.read(p.log)
    assert.matches("hog[^\n]*not enough memory", log)
    -- Once: the rest of the read burst queued for the failed stage is
    -- released unread, not handed to it again.
    local _, raised = log:gsub("raised in channel_read", "")
    assert.are.equal(1, raised, log)

    -- The next connection is served: the first one's strings were garbage.
    local reply = H.exchange(port, "hello\n", 10)
    assert.are.equal("hello\n", reply)
    assert.is_true(H.metric(admin, "sluice_lua_memory_bytes", 'worker="0"') < 16 * MiB)
    H.stop_sluice(p)
  end)

  it("takes a new limit on SIGHUP", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local mod = H.tmpfile("hog.lua", HOG):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port, 16 * MiB, mod))
    local f = assert(io.open(p.config, "w"))
    f:write(config(port, admin, echo.port, 32 * MiB, mod))
    f:close()
    os.execute("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      return body and body:find("limit=33554432", 1, true)
    end, 10), H.read(p.log))
    H.stop_sluice(p)
  end)
end)
