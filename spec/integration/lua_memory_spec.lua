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

-- mod: the stage module, or nil for a listener with no pipeline.
local function config(port, admin, echo_port, limit, mod, workers)
  return ([[
return {
  workers = %d,
  lua_memory_limit = %d,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back", pipeline = { %s } },
  },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
  admin = { listen = "127.0.0.1:%d" },
}
]]):format(workers or 1, limit, port, mod and ("%q"):format(mod) or "", echo_port, admin)
end

-- Rewrites p's configuration file and sends SIGHUP.
local function reload(p, text)
  local f = assert(io.open(p.config, "w"))
  f:write(text)
  f:close()
  os.execute("kill -HUP " .. p.pid)
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

  it("closes the connection whose event sluice's own Lua could not deliver, releasing its buffer", function()
    -- The stage passes the first read on to the echo stage, whose write
    -- back is queued for this stage, then fills the heap to within a few
    -- bytes of the limit (the collector stopped, the JIT off): the next
    -- allocation is sluice's own, delivering that write, and is refused.
    local squeeze = H.tmpfile("squeeze.lua", [[
local ffi = require("ffi")
local table_new = require("table.new")
jit.off()
jit.flush()
local VLA, ONE = ffi.typeof("uint8_t[?]"), ffi.typeof("uint8_t[1]")
local done = false
local function fill()
  collectgarbage("stop")
  local t, i, n = table_new(512, 0), 0, 1048576
  while n >= 1 do
    local ok, x = pcall(VLA, n)
    if ok then i = i + 1; t[i] = x else n = math.floor(n / 2) end
  end
  while true do
    local ok, x = pcall(ONE)
    if not ok then break end
    i = i + 1
    t[i] = x
  end
end
return {
  channel_read = function(ctx, buf)
    ctx:fire_read(buf)
    if not done then
      done = true
      fill()
    end
  end,
  write = function(ctx, buf, p) ctx:write(buf, p) end,
  flush = function(ctx) ctx:flush() end,
}
]]):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  lua_memory_limit = %d,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { %q, "sluice.stages.echo" } } },
  admin = { listen = "127.0.0.1:%d" },
}
]]):format(4 * MiB, port, squeeze, admin))
    local c = H.connect(port)
    c.send("lost\n")
    -- The connection closes (end of input, not a timeout): the write of
    -- its echo could not be delivered.
    assert.are.equal("", c.recv(5, 10))
    c.close()
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10), H.read(p.log))
    assert.is_true(H.metric(admin, "sluice_lua_memory_refusals_total", 'worker="0"') >= 1)
    local log = H.read(p.log)
    assert.matches("closed: Lua dispatch failed: not enough memory", log, 1, true)
    -- The next connection is served.
    assert.are.equal("next\n", H.exchange(port, "next\n", 10))
    H.stop_sluice(p)
  end)

  it("takes a new limit on SIGHUP", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local mod = H.tmpfile("hog.lua", HOG):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port, 16 * MiB, mod))
    reload(p, config(port, admin, echo.port, 32 * MiB, mod))
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      return body and body:find("limit=33554432", 1, true)
    end, 10), H.read(p.log))
    -- A configuration with no Lua stage: the state stays for the
    -- connections of the earlier one, under the new limit.
    reload(p, config(port, admin, echo.port, 8 * MiB, nil))
    assert.is_truthy(H.wait_for(function()
      local _, _, body = H.admin_get(admin, "/memory")
      return body and body:find("limit=8388608", 1, true)
    end, 10), H.read(p.log))
    H.stop_sluice(p)
  end)

  it("refuses to start, naming the limit, when a stage module does not fit it", function()
    -- 4 MiB of strings while the module loads, under a 2 MiB limit.
    local big = H.tmpfile("big.lua", [[
local t = {}
for i = 1, 64 do t[i] = string.rep("y", 65536) .. i end
return { channel_read = function(ctx, buf) ctx:fire_read(buf) end, kept = t }
]]):match("([^/]+)%.lua$")
    local path = H.tmpfile("sluice.lua", config(H.free_port(), H.free_port(), H.free_port(),
                                                2 * MiB, big))
    local out, rc = H.sh(("SLUICE_ROOT=%s %s -c %s 2>&1"):format(H.shq(H.root), H.shq(H.bin),
                                                                  H.shq(path)))
    assert.are.equal(1, rc, out)
    assert.matches("sluice: cannot start: worker 0: stage " .. big
                   .. ": not enough memory (lua_memory_limit is 2097152 bytes)", out, 1, true)
    assert.not_matches("started with", out, 1, true)
  end)

  it("keeps every worker's limit when a reload is refused", function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local mod = H.tmpfile("hog.lua", HOG):match("([^/]+)%.lua$")
    -- Loads on worker 0, fails on worker 1: worker 0 was prepared before
    -- the reload was refused.
    local picky = H.tmpfile("picky.lua", [[
if require("sluice.host").worker_id == 1 then error("not on worker 1") end
return { channel_read = function(ctx, buf) ctx:fire_read(buf) end }
]]):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin, echo.port, 16 * MiB, mod, 2))
    reload(p, config(port, admin, echo.port, 32 * MiB, picky, 2))
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("reload refused", 1, true)
    end, 10))
    assert.matches("worker 1: stage picky_%d+: [^\n]*not on worker 1", H.read(p.log))
    local _, _, body = H.admin_get(admin, "/memory")
    assert.matches("worker=0 bytes=%d+ limit=16777216 ", body)
    assert.matches("worker=1 bytes=%d+ limit=16777216 ", body)
    H.stop_sluice(p)
  end)
end)
