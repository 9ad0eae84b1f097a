-- lua_memory_limit through the real binary: a stage that keeps everything
-- its client sends hits the limit, that connection closes with "not enough
-- memory" and the stage named, every buffer comes back, and the next
-- connection is served; /memory and /metrics show the limit and the
-- refusals; a reload changes the limit.
local H = require("helpers")
local ffi = require("ffi")

ffi.cdef[[
long send(int fd, const void *buf, unsigned long n, int flags);
]]
local MSG_NOSIGNAL = 0x4000


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
-- Lua for a stage module: fill(t) fills the heap, from the collector's
-- point of view, to within 17 bytes of where allocations are refused
-- (twice the limit), keeping everything in t (the JIT off, so that no
-- allocation is sunk; the caller stops the collector).
local FILL = [[
local ffi = require("ffi")
local table_new = require("table.new")
jit.off()
jit.flush()
local VLA, ONE = ffi.typeof("uint8_t[?]"), ffi.typeof("uint8_t[1]")
local function fill(t)
  local i, n = 0, 1048576
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
]]

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

-- One worker, a listener whose pipeline is mod then the echo stage, and
-- an admin endpoint when admin is given.
local function echo_config(port, limit, mod, admin)
  return ([[
return {
  workers = 1,
  lua_memory_limit = %d,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { %q, "sluice.stages.echo" } } },
  %s
}
]]):format(limit, port, mod, admin and ('admin = { listen = "127.0.0.1:%d" },'):format(admin) or "")
end

-- Rewrites p's configuration file and sends SIGHUP.
-- Waits until /memory shows worker 0's Lua heap under limit bytes.
local function wait_limit(p, admin, limit)
  assert.is_truthy(H.wait_for(function()
    local _, _, body = H.admin_get(admin, "/memory")
    return body and body:find("limit=" .. limit, 1, true)
  end, 10), H.read(p.log))
end

local function reload(p, text)
  local f = assert(io.open(p.config, "w"))
  f:write(text)
  f:close()
  os.execute("kill -HUP " .. p.pid)
end

describe("lua_memory_limit", function()
  local peers = H.killed_after_each()

  -- One worker under limit, a listener through the hog stage (a module
  -- beside the config) to an echo peer. Returns p, port, admin, echo, mod.
  local function start_hog(limit)
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local mod = H.tmpfile("hog.lua", HOG):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    return H.start_sluice(config(port, admin, echo.port, limit, mod)), port, admin, echo, mod
  end

  -- 8 MiB through the hog, in reads of at most 64 KiB: at least 128
  -- chunks, 32 MiB kept; its connection closes before all come back.
  local function upload_cut_short(port)
    local input = H.tmpfile("big.bin")
    H.sh(("head -c %d /dev/zero > %s"):format(8 * MiB, H.shq(input)))
    local out = H.exchange(port, { file = input }, 30)
    assert.is_true(#out < 8 * MiB, tostring(#out))
  end

  it("closes the connection whose stage reaches it, and serves the next", function()
    local p, port, admin = start_hog(16 * MiB)

    local _, _, body = H.admin_get(admin, "/memory")
    assert.matches("worker=0 bytes=%d+ limit=16777216 refused=0", body)

    upload_cut_short(port)
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10))
    assert.is_true(H.metric(admin, "sluice_lua_memory_refusals_total", 'worker="0"') >= 1)
    local log = H.read(p.log)
    assert.matches("hog[^\n]*not enough memory", log)
    -- Once: the rest of the read burst queued for the failed stage is
    -- released unread, not handed to it again.
    local _, stopped = log:gsub("held more than lua_memory_limit after channel_read", "")
    assert.are.equal(1, stopped, log)

    -- The next connection is served: the first one's strings were garbage.
    local reply = H.exchange(port, "hello\n", 10)
    assert.are.equal("hello\n", reply)
    assert.is_true(H.metric(admin, "sluice_lua_memory_bytes", 'worker="0"') < 16 * MiB)
    H.stop_sluice(p)
  end)

  it("releases the buffer of an event sluice's own Lua could not deliver, and closes its connection", function()
    -- An on_complete callback (no stage to stop) fills the heap to within
    -- bytes of twice the limit, where allocations are refused, and holds
    -- it (the collector stopped, the JIT off). The event queued next, the
    -- echo's write back to this stage, cannot be handed over: sluice's own
    -- allocation for it is refused.
    local squeeze = H.tmpfile("squeeze.lua", FILL .. [[
local filler, promise
local function squeeze()
  collectgarbage()
  collectgarbage()
  collectgarbage("stop")
  filler = table_new(512, 0)
  fill(filler)
end
return {
  channel_read = function(ctx, buf)
    if promise == nil then
      promise = ctx:write("p")
      promise:on_complete(squeeze)
      ctx:flush()
    end
    ctx:fire_read(buf)
  end,
  write = function(ctx, buf, p) ctx:write(buf, p) end,
  flush = function(ctx) ctx:flush() end,
}
]]):match("([^/]+)%.lua$")
    local port = H.free_port()
    local p = H.start_sluice(echo_config(port, 2 * MiB, squeeze))
    local c = H.connect(port)
    c.send("lost\n")
    -- "p" went out before; the echo of "lost" cannot, and the connection
    -- closes (end of input, not a timeout).
    assert.are.equal("p", c.recv(6, 10))
    c.close()
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("closed: Lua dispatch failed: not enough memory", 1, true)
    end, 10), H.read(p.log))
    -- The pool is clean at exit: the write's buffer was released.
    H.stop_sluice(p)
  end)

  it("closes the connection of a stage that keeps a buffer its handle cannot be tracked for", function()
    -- The stage keeps the buffer it is handed; the host then gives that
    -- handle a finalizer, which needs the finalizer table to grow. The
    -- stage has filled that table, and the heap to where allocations are
    -- refused (twice the limit), and holds all of it but 32 KiB: a
    -- collection frees that much, enough to log, never enough for the
    -- table; a retry would be refused for ever.
    local keeper = H.tmpfile("keeper.lua", FILL .. [[
local function nop() end
local kept, filler, spare
local function squeeze()
  collectgarbage()
  collectgarbage("stop")
  spare = table_new(8192, 0)
  for i = 1, 8192 do spare[i] = ONE() end
  for j = 1, 2048 do ffi.gc(spare[j], nop) end  -- a finalizer table of 2048 or more
  local slack = VLA(32768)
  filler = table_new(512, 0)
  fill(filler)
  for j = 2049, 8192 do
    if not pcall(ffi.gc, spare[j], nop) then break end
  end
  slack = nil
end
return {
  channel_read = function(ctx, buf)
    if kept == nil then
      kept = { buf }
      squeeze()
      return
    end
    ctx:fire_read(buf)
  end,
  channel_inactive = function(ctx)
    if filler then
      filler, spare = nil, nil
      collectgarbage("restart")
      collectgarbage()
    end
    ctx:fire_inactive()
  end,
}
]]):match("([^/]+)%.lua$")
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(echo_config(port, 4 * MiB, keeper, admin))
    local c = H.connect(port)
    c.send("kept\n")
    assert.are.equal("", c.recv(5, 10))
    c.close()
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("closed: stage " .. keeper .. " failed: not enough memory", 1, true)
    end, 10), H.read(p.log))
    local log = H.read(p.log)
    assert.matches("stage " .. keeper .. " held more than lua_memory_limit after channel_read on "
                   .. "client [^\n]*: not enough memory", log)
    assert.not_matches("Lua dispatch", log, 1, true)
    -- The worker serves the next connection.
    assert.are.equal("next\n", H.exchange(port, "next\n", 10))
    H.stop_sluice(p)
  end)

  it("stops a stage that keeps every buffer it is handed, and the process carries on", function()
    -- Handles kept with their finalizers: the collector's own tables grow
    -- with them. Refusing an allocation the collector makes (run at a JIT
    -- trace's exit) crashed the process; retrying a finalizer that could
    -- not be set hung the worker.
    local keeper = H.tmpfile("keeper.lua", [[
local kept = setmetatable({}, { __mode = "k" })
return {
  channel_read = function(ctx, buf)
    local t = kept[ctx] or {}
    kept[ctx] = t
    t[#t + 1] = buf
  end,
}
]]):match("([^/]+)%.lua$")
    local passer = H.tmpfile("passer.lua", [[
return { channel_read = function(ctx, buf) ctx:fire_read(buf) end }
]]):match("([^/]+)%.lua$")
    local port, port2, admin = H.free_port(), H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  lua_memory_limit = %d,
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", pipeline = { %q } },
    { name = "echo", listen = "127.0.0.1:%d", pipeline = { %q, "sluice.stages.echo" } },
  },
  admin = { listen = "127.0.0.1:%d" },
}
]]):format(MiB, port, keeper, port2, passer, admin))
    -- Small writes, each its own read and buffer, until sluice closes.
    local c = H.connect(port)
    assert(ffi.C.setsockopt(c.fd, 6, 1, ffi.new("int[1]", 1), 4) == 0)   -- TCP_NODELAY
    local sent = 0
    for _ = 1, 100000 do
      if ffi.C.send(c.fd, "xxxxxxxxxxxxxxxxxxxx", 20, MSG_NOSIGNAL) ~= 20 then break end
      sent = sent + 20
      H.sleep(0.0001)
    end
    c.close()
    assert.is_true(H.alive(p), H.read(p.log))
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_connections_open", 'listener="front"') == 0
    end, 10), H.read(p.log))
    local log = H.read(p.log)
    assert.matches("stage " .. keeper .. " held more than lua_memory_limit after channel_read", log, 1, true)
    assert.not_matches("Lua dispatch", log, 1, true)
    assert.is_true(sent < 100000 * 20, tostring(sent))
    -- The worker's Lua serves the next connection.
    assert.are.equal("hello\n", H.exchange(port2, "hello\n", 10))
    H.stop_sluice(p, { leaks_expected = true })
  end)

  it("takes a new limit on SIGHUP", function()
    local p, port, admin, echo, mod = start_hog(16 * MiB)
    reload(p, config(port, admin, echo.port, 32 * MiB, mod))
    wait_limit(p, admin, 33554432)
    -- A configuration with no Lua stage: the state stays for the
    -- connections of the earlier one, under the new limit.
    reload(p, config(port, admin, echo.port, 8 * MiB, nil))
    wait_limit(p, admin, 8388608)
    H.stop_sluice(p)
  end)

  it("counts the heap from a limit a reload sets on a state that had none", function()
    -- Without a limit the state's allocator is LuaJIT's own, uncounted;
    -- the first limit puts the counting one in front of it.
    local p, port, admin, echo, mod = start_hog(0)
    reload(p, config(port, admin, echo.port, 16 * MiB, mod))
    wait_limit(p, admin, 16777216)
    upload_cut_short(port)
    assert.is_truthy(H.wait_for(function()
      return H.metric(admin, "sluice_lua_memory_refusals_total", 'worker="0"') >= 1
    end, 10), H.read(p.log))
    assert.are.equal("hello\n", H.exchange(port, "hello\n", 10))
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
