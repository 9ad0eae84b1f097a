-- Write promises reported by the outbound queue, seen from Lua through
-- sluice.testing's in-memory channel (the real pipeline and queue): success
-- once the bytes leave, outbound_limit for what a closing queue held.
local testing = require("sluice.testing")

-- Bytes one queued buffer counts besides its own (SL_OUTQ_ENTRY_OVERHEAD).
local ENTRY_OVERHEAD = 88
local DEFAULT_LIMIT = 16 * 1024 * 1024

describe("write promises", function()
  after_each(function() assert.no_leaks() end)

  it("complete when held by nothing but their callback", function()
    local results = {}
    local stage = { channel_read = function(ctx, b)
      b:release()
      for i = 1, 3 do
        -- The promise is not kept anywhere: only its callback refers to it.
        ctx:write("reply " .. i):on_complete(function(ok, err) results[i] = { ok, err } end)
      end
      ctx:flush()
    end }
    local ch = testing.channel{ stage }
    ch:write_inbound("go")
    collectgarbage()
    collectgarbage()
    assert.are.same({}, results) -- flushed, not yet taken by the "socket"
    assert.are.equal("reply 1reply 2reply 3", ch:outbound_string())
    assert.are.same({ { true }, { true }, { true } }, results)
    assert.is_false(ch:finish())
  end)

  it("refuse what is not a promise, false or nil, before making a buffer of a string", function()
    local errors = {}
    local stage = { channel_read = function(ctx, b)
      b:release()
      for _, bad in ipairs({ 5, true, {} }) do
        local ok, err = pcall(ctx.write, ctx, "reply", bad)
        errors[#errors + 1] = not ok and err
      end
      ctx:write("fine", false)
      ctx:flush()
    end }
    local ch = testing.channel{ stage }
    ch:write_inbound("go")
    assert.are.same({
      "bad 'promise' argument (promise, false or nil expected, got number)",
      "bad 'promise' argument (promise, false or nil expected, got boolean)",
      "bad 'promise' argument (promise, false or nil expected, got table)",
    }, errors)
    assert.are.equal("fine", ch:outbound_string())
    assert.is_false(ch:finish())
  end)

  it("fail with outbound_limit when the queue would exceed it, then with closed", function()
    local results = {}
    local block = string.rep("x", 65536)
    local stage = { channel_read = function(ctx, b)
      b:release()
      for i = 1, 300 do
        ctx:write(block):on_complete(function(ok, err) results[i] = ok and "ok" or err end)
      end
      ctx:flush()
    end }
    local ch = testing.channel{ stage }
    ch:write_inbound("flood")
    -- The entries that fit under 16 MiB, and the write that did not, fail
    -- with outbound_limit; every later write finds the channel closed.
    local fit = math.floor(DEFAULT_LIMIT / (65536 + ENTRY_OVERHEAD))
    assert.are.equal(300, #results)
    for i = 1, 300 do
      assert.are.equal(i <= fit + 1 and "outbound_limit" or "closed", results[i], "write " .. i)
    end
    assert.is_false(ch:is_open())
    assert.matches("^outbound_limit %(", ch:close_reason())
    ch:finish()
  end)

  -- A stage whose write callback drops what it is given: it neither passes
  -- the write on nor completes its promise.
  local swallow = { write = function(_, msg) msg:release() end }

  -- A stage that writes what it reads, noting how each write's promise
  -- completes; weak: the promises themselves, to see them go.
  local function writer(results, weak)
    return { channel_read = function(ctx, b)
      local i = #results + 1
      results[i] = "pending"
      local p = ctx:write(b)
      p:on_complete(function(ok, err) results[i] = ok and "ok" or err end)
      if weak then weak[i] = p end
      ctx:flush()
    end }
  end

  it("fail with closed when a stage dropped them and the connection closes, and are let go", function()
    local results, weak = {}, setmetatable({}, { __mode = "v" })
    local ch = testing.channel{ swallow, writer(results, weak) }
    ch:write_inbound("one", "two")
    assert.are.same({ "pending", "pending" }, results)
    assert.are.equal("", ch:outbound_string())
    assert.is_false(ch:finish())
    assert.are.same({ "closed", "closed" }, results)
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(weak))
  end)

  it("fail with closed when the stage that dropped them leaves a running pipeline", function()
    local results = {}
    local w = writer(results)
    local remover = { channel_read = function(ctx, b)
      if b:tostring() == "drop the swallower" then
        b:release()
        local p = ctx:pipeline()
        return p:remove(p:names()[1]) -- the swallower
      end
      ctx:fire_read(b)
    end }
    local ch = testing.channel{ swallow, remover, w }
    ch:write_inbound("lost")
    assert.are.same({ "pending" }, results)
    ch:write_inbound("drop the swallower")
    assert.are.same({ "closed" }, results)
    ch:write_inbound("kept")
    assert.are.equal("kept", ch:outbound_string())
    assert.are.same({ "closed", "ok" }, results)
    assert.is_true(ch:is_open())
    assert.is_false(ch:finish())
  end)

  it("complete with the bytes when a stage passes them on, also from its removed callback", function()
    local results = {}
    local hold = false
    -- Passes writes on at once, or holds them until it leaves the pipeline.
    local holder = {
      write = function(ctx, msg, p)
        if not hold then return ctx:write(msg, p) end
        ctx.state.held = ctx.state.held or {}
        table.insert(ctx.state.held, { msg, p })
      end,
      removed = function(ctx)
        for _, w in ipairs(ctx.state.held or {}) do ctx:write(w[1], w[2]) end
        ctx:flush()
      end,
    }
    local control = { channel_read = function(ctx, b)
      local s = b:tostring()
      if s == "hold" then
        b:release()
        hold = true
      elseif s == "leave" then
        b:release()
        local p = ctx:pipeline()
        p:remove(p:names()[1]) -- the holder
      else
        ctx:fire_read(b)
      end
    end }
    local ch = testing.channel{ holder, control, writer(results) }
    ch:write_inbound("a")
    assert.are.equal("a", ch:outbound_string())
    ch:write_inbound("hold")
    ch:write_inbound("b")
    assert.are.same({ "ok", "pending" }, results)
    ch:write_inbound("leave")
    assert.are.equal("b", ch:outbound_string())
    assert.are.same({ "ok", "ok" }, results)
    assert.is_false(ch:finish())
  end)
end)
