-- What the host does when a stage raises, through sluice.testing's
-- in-memory channel (the real pipeline and host): whatever the error value
-- is, the buffer the stage was handed is released and its connection
-- closes; and a stage that failed is not called again on that connection
-- but for the cleanup its end brings (channel_inactive, removed).
local testing = require("sluice.testing")

-- A stage that raises `err` at its first read.
local function raising(err)
  return { channel_read = function(ctx, b)
    ctx.state.b = b -- still owned by the stage when it raises
    error(err)
  end }
end

describe("a stage that raises", function()
  after_each(function() assert.no_leaks() end)

  local function failed_with(err)
    local ch = testing.channel{ raising(err) }
    ch:write_inbound("x")
    assert.is_false(ch:is_open())
    local reason = ch:close_reason()
    assert.is_false(ch:finish()) -- raises with the report if the buffer leaked
    return reason
  end

  it("closes its connection with the text of an error object's __tostring", function()
    local obj = setmetatable({}, { __tostring = function() return "bad frame 7" end })
    assert.are.equal("stage stage1 failed: bad frame 7", (failed_with(obj):gsub("stage%d+", "stage1")))
    assert.are.equal("bad frame 7", tostring(obj)) -- its metatable as it was
  end)

  it("is contained when its error object's __tostring raises: buffer released, connection closed", function()
    local reason = failed_with(setmetatable({}, { __tostring = function() error("inner") end }))
    assert.matches("^stage stage%d+ failed: %(an error object whose __tostring failed: .*inner%)$", reason)
  end)

  it("is contained when its error object's __tostring calls tostring on itself", function()
    -- (In LuaJIT, tostring -> __tostring -> tostring is a loop of tail calls:
    -- nothing but sluice can end it.)
    local obj = setmetatable({}, { __tostring = function(self) return tostring(self) end })
    local reason = failed_with(obj)
    assert.matches("^stage stage%d+ failed: table: 0x%x+$", reason)
  end)

  it("is contained when its error object's __tostring returns something else than a string", function()
    local reason = failed_with(setmetatable({}, { __tostring = function() return 42 end }))
    assert.matches("failed: %(an error object whose __tostring failed: it returned a number%)$", reason)
    reason = failed_with(setmetatable({}, { __tostring = function() error({}) end }))
    assert.matches("failed: %(an error object whose __tostring failed: it raised a table%)$", reason)
  end)

  it("is contained with a protected metatable and with nil", function()
    local reason = failed_with(setmetatable({}, { __metatable = false,
                                                  __tostring = function() error("inner") end }))
    assert.matches("__tostring failed: .*inner%)$", reason)
    assert.matches("^stage stage%d+ failed: nil$", failed_with(nil))
  end)
end)

describe("a stage that failed", function()
  after_each(function() assert.no_leaks() end)

  it("gets channel_inactive and removed, and the stages after it see the connection go", function()
    local calls, after = {}, {}
    local function note(t, what) t[#t + 1] = what end
    local failing = {
      channel_writability_changed = function(_, w)
        note(calls, "writability " .. tostring(w))
        error("cannot cope")
      end,
      channel_read_complete = function(ctx) note(calls, "read_complete") ctx:fire_read_complete() end,
      channel_inactive = function(ctx) note(calls, "inactive") ctx:fire_inactive() end,
      removed = function() note(calls, "removed") end,
    }
    -- After it: writes past the high water mark (the head tells the failing
    -- stage the connection is no longer writable), and sees the connection go.
    local writer = {
      channel_read = function(ctx, b)
        b:release()
        ctx:write(string.rep("x", 300), false)
      end,
      channel_read_complete = function(ctx) note(after, "read_complete") end,
      channel_inactive = function(ctx) note(after, "inactive") ctx:fire_inactive() end,
      removed = function() note(after, "removed") end,
    }
    local ch = testing.channel({ failing, writer }, { low_water_mark = 100, high_water_mark = 200 })
    ch:write_inbound("go")
    assert.is_false(ch:is_open())
    assert.matches("failed: .*cannot cope", ch:close_reason())
    -- (A close that fires writability again, as a socket's does, is in
    -- spec/integration/proxy_spec.lua.)
    assert.are.same({ "writability false", "inactive", "removed" }, calls)
    assert.are.same({ "inactive", "removed" }, after)
    assert.is_false(ch:finish())
  end)

  it("drops what a Lua stage next to it still passes on, and passes other events on", function()
    local calls, after = {}, {}
    local failing = {
      channel_read = function(_, b)
        b:release()
        calls[#calls + 1] = "read"
        error("broken")
      end,
      user_event = function(ctx, name) calls[#calls + 1] = "user_event" ctx:fire_user_event(name) end,
    }
    -- Before it: as the connection goes, passes more on (direct calls).
    local before = {
      channel_inactive = function(ctx)
        ctx:fire_user_event("bye")
        ctx:fire_read("late") -- dropped
        ctx:fire_read(ctx:alloc(16)) -- dropped: released unread
        ctx:fire_inactive()
      end,
    }
    local last = {
      channel_read = function(_, msg) after[#after + 1] = msg end,
      user_event = function(_, name) after[#after + 1] = name end,
    }
    local ch = testing.channel{ before, failing, last }
    ch:write_inbound("one")
    assert.is_false(ch:is_open())
    assert.are.same({ "read" }, calls)
    assert.are.same({ "bye" }, after)
    assert.is_false(ch:finish())
  end)
end)
