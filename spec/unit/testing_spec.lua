-- sluice.testing: the in-memory channel runs the real pipeline.
local testing = require("sluice.testing")
local buf = require("sluice.buf")

local upper = {
  channel_read = function(ctx, b)
    local s = b:tostring():upper()
    b:release()
    ctx:fire_read(s)
  end,
}

local answer = {
  channel_read = function(ctx, msg)
    local s = type(msg) == "string" and msg or msg:tostring()
    if type(msg) ~= "string" then msg:release() end
    ctx:write_and_flush("got " .. s)
  end,
}

describe("sluice.testing channel", function()
  after_each(function() assert.no_leaks() end)

  it("carries inbound messages to read_inbound and writes to read_outbound", function()
    local ch = testing.channel{ upper }
    assert.is_true(ch:write_inbound("hello"))
    assert.are.equal("HELLO", ch:read_inbound())
    assert.is_nil(ch:read_inbound())
    assert.is_false(ch:finish())
  end)

  it("keeps delivering inbound messages after some were read", function()
    local ch = testing.channel{ upper }
    assert.is_true(ch:write_inbound("one"))
    assert.are.equal("ONE", ch:read_inbound())
    assert.is_true(ch:write_inbound("two", "three"))
    assert.are.equal("TWO", ch:read_inbound())
    assert.is_true(ch:write_inbound("four"))
    assert.are.equal("THREE", ch:read_inbound())
    assert.are.equal("FOUR", ch:read_inbound())
    assert.is_nil(ch:read_inbound())
    assert.is_false(ch:finish())
  end)

  it("lets a stage answer through the real outbound queue", function()
    local ch = testing.channel{ upper, answer }
    ch:write_inbound("ping")
    assert.outbound(ch, "got PING")
    assert.is_false(ch:finish())
  end)

  it("runs builtin C stages by name", function()
    local ch = testing.channel{ "sluice.stages.echo" }
    ch:write_inbound("abc", "def")
    assert.outbound(ch, "abcdef")
    assert.is_false(ch:finish())
  end)

  it("hands the buffer that reached the end to the reader, who releases it", function()
    local ch = testing.channel{ { channel_read = function(ctx, b) ctx:fire_read(b) end } }
    ch:write_inbound("xyz")
    local b = ch:read_inbound()
    assert.are.equal("xyz", b:tostring())
    assert.are.equal(1, ch:outstanding())
    b:release()
    assert.is_false(ch:finish())
  end)

  it("finish() reports unread messages and releases them", function()
    local ch = testing.channel{}
    ch:write_inbound("left")
    assert.is_true(ch:finish())
  end)

  it("finish() raises with the leak report when a stage keeps a buffer", function()
    local kept
    local ch = testing.channel{ { channel_read = function(ctx, b) kept = b end } }
    ch:write_inbound("kept")
    local ok, err = pcall(ch.finish, ch)
    assert.is_false(ok)
    assert.matches("1 buffer %(%d+ bytes%) still outstanding", err)
    assert.matches("LEAK: buffer of %d+ bytes was not released", err)
    assert.are.equal(0, kept:refcnt())
  end)

  it("closes the channel when a stage raises, releasing what it was handed", function()
    local ch = testing.channel{ { channel_read = function() error("bad frame") end } }
    ch:write_inbound("x")
    assert.is_false(ch:is_open())
    assert.matches("stage .* failed: .*bad frame", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("runs timers on the virtual clock", function()
    local fired = {}
    local stage = {
      channel_active = function(ctx)
        ctx:after(100, function() fired[#fired + 1] = "a" end)
        local t = ctx:after(50, function() fired[#fired + 1] = "cancelled" end)
        t:cancel()
        ctx:after(150, function(c) fired[#fired + 1] = "b"; c:write_and_flush("tick") end)
      end,
    }
    local ch = testing.channel{ stage }
    ch:advance_time(99)
    assert.are.same({}, fired)
    ch:advance_time(1)
    assert.are.same({ "a" }, fired)
    ch:advance_time(100)
    assert.are.same({ "a", "b" }, fired)
    assert.outbound(ch, "tick")
    assert.is_false(ch:finish())
  end)

  it("refuses a timer without a non-negative delay or a function, NaN included", function()
    local errors = {}
    local stage = {
      channel_active = function(ctx)
        for _, ms in ipairs({ -1, 0 / 0, "10" }) do
          local ok, err = pcall(ctx.after, ctx, ms, function() end)
          errors[#errors + 1] = not ok and err
        end
        local ok, err = pcall(ctx.after, ctx, 10)
        errors[#errors + 1] = not ok and err
      end,
    }
    local ch = testing.channel{ stage }
    assert.are.same({
      "bad 'ms' argument (non-negative number expected, got -1)",
      "bad 'ms' argument (non-negative number expected, got " .. tostring(0 / 0) .. ")",
      "bad 'ms' argument (non-negative number expected, got 10)",
      "bad 'fn' argument (function expected, got nil)",
    }, errors)
    assert.is_false(ch:finish())
  end)

  it("delivers writability changes when the test says the peer is slow", function()
    local seen = {}
    local ch = testing.channel{ { channel_writability_changed = function(ctx, w)
      seen[#seen + 1] = w
      seen[#seen + 1] = ctx:is_writable()
    end } }
    ch:set_writable(false)
    ch:set_writable(true)
    assert.are.same({ false, false, true, true }, seen)
    assert.is_false(ch:finish())
  end)

  it("crosses the water marks of the real outbound queue", function()
    local seen = {}
    local ch = testing.channel({ { channel_writability_changed = function(_, w) seen[#seen + 1] = w end } },
                               { low_water_mark = 100, high_water_mark = 200 })
    ch:write_outbound(string.rep("x", 300))
    assert.are.same({ false }, seen)
    local b = ch:read_outbound()
    assert.are.equal(300, #b)
    b:release()
    assert.are.same({ false, true }, seen)
    assert.is_false(ch:finish())
  end)

  it("passes tables between Lua stages", function()
    local decode = { channel_read = function(ctx, b)
      local s = b:tostring()
      b:release()
      ctx:fire_read({ cmd = s:match("^(%w+)"), raw = s })
    end }
    local route = { channel_read = function(ctx, m) ctx:fire_read(m.cmd) end }
    local ch = testing.channel{ decode, route }
    ch:write_inbound("GET key")
    assert.are.equal("GET", ch:read_inbound())
    assert.is_false(ch:finish())
  end)

  it("changes a running pipeline: replace a stage by another", function()
    local switch
    switch = { channel_read = function(ctx, b)
      if b:tostring() == "UPGRADE" then
        b:release()
        ctx:pipeline():replace(ctx.name, upper, "upper")
        return
      end
      ctx:fire_read(b)
    end }
    local ch = testing.channel{ switch }
    ch:write_inbound("UPGRADE")
    ch:write_inbound("quiet")
    assert.are.equal("QUIET", ch:read_inbound())
    assert.is_false(ch:finish())
  end)

  it("sends read requests from a stage through the outbound read callbacks to the head", function()
    local seen = {}
    local watcher = { read = function(ctx) seen[#seen + 1] = "read"; ctx:read() end }
    local asker = { channel_active = function(ctx)
      ctx:set_autoread(false)
      ctx:read()
      ctx:fire_active()
    end }
    local ch = testing.channel{ watcher, asker }
    assert.are.same({ "read" }, seen)
    assert.is_false(ch:finish())
  end)

  it("says why a stage module cannot be added: its own load error, or no such stage", function()
    local errors = {}
    local stage = { channel_read = function(ctx, b)
      b:release()
      for _, m in ipairs({ "spec.fixtures.stages.broken_syntax", "spec.fixtures.stages.raises_at_load",
                           "spec.fixtures.stages.not_there" }) do
        local ok, err = pcall(ctx:pipeline().add_last, ctx:pipeline(), m)
        errors[#errors + 1] = not ok and err
      end
    end }
    local ch = testing.channel{ stage }
    ch:write_inbound("go")
    assert.matches('cannot add stage "spec%.fixtures%.stages%.broken_syntax": module failed to load: '
                   .. "error loading module 'spec%.fixtures%.stages%.broken_syntax' from file "
                   .. "'%./spec/fixtures/stages/broken_syntax%.lua':\n[^\n]*broken_syntax%.lua:3: '}' "
                   .. "expected", errors[1])
    assert.matches('cannot add stage "spec%.fixtures%.stages%.raises_at_load": module failed to load: '
                   .. "[^\n]*raises_at_load%.lua:2: cannot start: no key configured$", errors[2])
    assert.matches('cannot add stage "spec.fixtures.stages.not_there": no C stage named '
                   .. '"spec.fixtures.stages.not_there"', errors[3], 1, true)
    assert.is_false(ch:finish())
    assert.has_error(function() testing.channel{ "spec.fixtures.stages.raises_at_load" } end)
    local ok, err = pcall(testing.channel, { "spec.fixtures.stages.raises_at_load" })
    assert.is_false(ok)
    assert.matches("module failed to load: [^\n]*cannot start: no key configured", err)
  end)

  it("lists, adds and removes stages of a running pipeline", function()
    local names
    local probe = { channel_read = function(ctx, b)
      local p = ctx:pipeline()
      p:add_after(ctx.name, "sluice.stages.echo", "echo")
      names = p:names()
      b:release()
    end }
    local ch = testing.channel{ probe }
    ch:write_inbound("x")
    assert.are.equal(3, #names) -- probe, echo, and the channel's capture stage
    assert.are.equal("sluice.stages.echo", names[2])
    assert.is_false(ch:finish())
  end)

  it("simple_inbound releases after the handler unless it retained", function()
    local sluice = require("sluice")
    local seen, kept = {}, nil
    local ch = testing.channel{ sluice.simple_inbound(function(ctx, b)
      seen[#seen + 1] = b:tostring()
      if b:tostring() == "keep" then kept = b:retain() end -- one more reference: ours
    end) }
    ch:write_inbound("once", "keep")
    assert.are.same({ "once", "keep" }, seen)
    -- simple_inbound released its reference; the retained one is still live.
    assert.are.equal(1, kept.refs)
    assert.are.equal("keep", kept:tostring())
    kept:release()
    assert.is_false(ch:finish())
  end)

  it("write promises fail with 'closed' on a closed channel", function()
    local result
    local stage = { channel_read = function(ctx, b)
      b:release()
      ctx:close("done")
      ctx:write("late"):on_complete(function(ok, err) result = { ok, err } end)
    end }
    local ch = testing.channel{ stage }
    ch:write_inbound("x")
    assert.are.same({ false, "closed" }, result)
    assert.is_false(ch:finish())
  end)
end)

describe("sluice.testing channel, failures", function()
  after_each(function() assert.no_leaks() end)

  it("a timer that raises closes its connection and the other timers still run", function()
    local fired = {}
    local stage = { channel_active = function(ctx)
      ctx:after(10, function() error("timer broke") end)
      ctx:after(20, function() fired[#fired + 1] = "late" end)
    end }
    local ch = testing.channel{ stage }
    local other = testing.channel{ { channel_active = function(ctx)
      ctx:after(30, function() fired[#fired + 1] = "other" end)
    end } }
    ch:advance_time(40)
    assert.is_false(ch:is_open())
    assert.matches("timer broke", ch:close_reason())
    assert.are.same({ "other" }, fired)
    assert.is_false(ch:finish())
    assert.is_false(other:finish())
  end)

  it("a stage that raises after passing a buffer on does not release it under the next stage", function()
    local kept
    local first = { channel_read = function(ctx, b)
      ctx:fire_read(b)
      error("after passing it on")
    end }
    local keeper = { channel_read = function(ctx, b) kept = b end }
    local ch = testing.channel{ first, keeper }
    ch:write_inbound("x")
    assert.are.equal(1, kept:refcnt())
    kept:release()
    assert.is_false(ch:finish())
  end)

  it("simple_inbound lets its handler pass the buffer to a Lua stage", function()
    local sluice = require("sluice")
    local got
    local ch = testing.channel{
      sluice.simple_inbound(function(ctx, b) ctx:fire_read(b) end),
      { channel_read = function(ctx, b) got = b:tostring(); b:release() end },
    }
    ch:write_inbound("pass")
    assert.are.equal("pass", got)
    assert.is_true(ch:is_open())
    assert.is_false(ch:finish())
  end)

  it("calls added for the stages it is given, and names unnamed stages apart", function()
    local names = {}
    local function stage() return { added = function(ctx) names[#names + 1] = ctx.name end } end
    local ch = testing.channel{ stage(), stage() }
    assert.are.equal(2, #names)
    assert.are_not.equal(names[1], names[2])
    assert.is_false(ch:finish())
  end)

  it("closes the channel when a stage closes it in added: later stages are not added", function()
    local later, active = false, false
    local ch = testing.channel{
      { added = function(ctx) ctx:close("denied") end },
      { added = function() later = true end, channel_active = function() active = true end },
    }
    assert.is_false(ch:is_open())
    assert.are.equal("denied", ch:close_reason())
    assert.is_false(later)
    assert.is_false(active)
    ch:write_inbound("dropped")  -- a closed channel releases what it is given
    assert.is_false(ch:finish())
  end)

  it("contains an error raised in added: the channel closes naming the stage", function()
    local ch = testing.channel{
      { added = function() error("no config for this client") end },
    }
    assert.is_false(ch:is_open())
    assert.matches("failed: .*no config for this client", ch:close_reason())
    assert.is_false(ch:finish())
  end)
end)
