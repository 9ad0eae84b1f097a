-- Leak detection through the real binary: a stage that keeps a buffer it was
-- handed. When the connection closes, the buffer is reported at once (no
-- garbage collector involved) and its memory reclaimed; what the report
-- holds depends on the level.
local H = require("helpers")

local function setup_proxy(level_cfg, env, before)
  local stage = H.tmpfile("hoarder.lua", [[
local held = {}            -- module level: outlives the connection
return {
  channel_read = function(ctx, buf)
    held[#held + 1] = buf  -- kept, never released
    ctx:write("held\n")
    ctx:flush()
  end,
}
]])
  local mod = stage:match("([^/]+)%.lua$")
  local echo = H.start_echo()
  local port = H.free_port()
  local cfg = ([[
return {
  leak_detection = %s,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { %s%q } } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(level_cfg, port, before and (("%q, "):format(before)) or "", mod, echo.port)
  local p = H.start_sluice(cfg, env)
  return p, port, mod, echo
end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

describe("leak detection", function()
  local echo
  after_each(function() if echo then H.stop(echo, "KILL") end end)

  it("reports a buffer still held when its connection closes, once, and reclaims it (paranoid)",
    function()
      local p, port, mod
      p, port, mod, echo = setup_proxy('"paranoid"')
      assert.are.equal("held\n", (H.exchange(port, "x", 5)))
      local closed = H.wait_for(function()
        return H.read(p.log):find("its connection was closed", 1, true)
      end, 10)
      local log = H.stop_sluice(p, { leaks_expected = true })
      assert.is_truthy(closed, log)
      assert.matches("LEAK: buffer of 2048 bytes was not released before its connection was "
                     .. "closed %(client 127%.0%.0%.1:%d+ on front%) %(refcnt 1%); its memory "
                     .. "was reclaimed", log)
      assert.matches("\n  #1 touched by " .. mod .. ", [%d.]+ ms after creation", log)
      assert.are.equal(1, count(log, "touched by"))  -- one hop, one record
      assert.matches("created at: read from client 127%.0%.0%.1:%d+ on front", log)
      -- Reported once: the handle collected at exit finds its buffer gone.
      assert.are.equal(1, count(log, "LEAK: "))
    end)

  it("records every hop, Lua stage to Lua stage included, newest first", function()
    local p, port, mod
    p, port, mod, echo = setup_proxy('"paranoid"', nil, "examples.stages.log_chunks")
    H.exchange(port, "x", 5)
    H.wait_for(function() return H.read(p.log):find("its connection was closed", 1, true) end, 10)
    local log = H.stop_sluice(p, { leaks_expected = true })
    assert.matches("\n  #2 touched by " .. mod .. ", [%d.]+ ms after creation"
                   .. "\n  #1 touched by examples%.stages%.log_chunks, [%d.]+ ms after creation"
                   .. "\n  created at: read from client", log)
  end)

  it("records the creation site but no touches at simple (every buffer sampled)", function()
    -- sample_rate 1: which buffer comes first depends on timing (a read at
    -- accept that finds nothing yet takes a buffer and gives it back).
    local p, port
    p, port, _, echo = setup_proxy('{ level = "simple", sample_rate = 1 }')
    H.exchange(port, "x", 5)
    H.wait_for(function() return H.read(p.log):find("its connection was closed", 1, true) end, 10)
    local log = H.stop_sluice(p, { leaks_expected = true })
    assert.matches("LEAK: buffer of 2048 bytes was not released before its connection was closed", log)
    assert.matches("created at: read from client", log)
    assert.not_matches("touched by", log)
  end)

  it("records touches of sampled buffers at advanced", function()
    local p, port, mod
    p, port, mod, echo = setup_proxy('{ level = "advanced", sample_rate = 1 }')
    H.exchange(port, "x", 5)
    H.wait_for(function() return H.read(p.log):find("its connection was closed", 1, true) end, 10)
    local log = H.stop_sluice(p, { leaks_expected = true })
    assert.matches("touched by " .. mod, log)
    assert.matches("created at: read from client", log)
  end)

  it("tracks nothing at disabled: the handle's finalizer still reclaims at exit", function()
    local p, port
    p, port, _, echo = setup_proxy('"simple"', "SLUICE_LEAK_DETECTION=disabled")
    H.exchange(port, "x", 5)
    H.wait_for(function() return H.read(p.log):find("on front closed", 1, true) end, 10)
    local log = H.stop_sluice(p, { leaks_expected = true })
    -- Nothing tracked, so no report at the close, at any time before exit.
    assert.not_matches("its connection was closed", log)
    assert.matches("LEAK: buffer of 2048 bytes was not released before its Lua handle was "
                   .. "garbage%-collected", log)
  end)
end)
