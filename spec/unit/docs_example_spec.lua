-- The example of docs/lua-api.md ("Testing a stage"): two stages and their
-- spec on the in-memory channel of sluice.testing.
local sluice = require("sluice")
local testing = require("sluice.testing")

-- Lines ending in "\n", passed on as strings without the "\n".
local lines = sluice.codec.decoder(function(ctx, cum, out)
  local nl = cum:find(10)                  -- absolute index of "\n", or nil
  if nl == nil then return end             -- wait for more bytes
  out[#out + 1] = cum:read_bytes(nl - cum:reader_index())
  cum:skip(1)
end, { max_cumulation = 64 })

-- Answers PING with PONG and passes other lines on; closes the connection
-- after 1000 ms without a line.
local function restart_idle(ctx)
  if ctx.state.idle then ctx.state.idle:cancel() end
  ctx.state.idle = ctx:after(1000, function(c) c:close("idle") end)
end

local pong = {
  channel_active = function(ctx)
    restart_idle(ctx)
    ctx:fire_active()
  end,
  channel_read = function(ctx, line)
    restart_idle(ctx)
    if line == "PING" then
      ctx:write_and_flush("PONG\n")
    else
      ctx:fire_read(line)
    end
  end,
  channel_inactive = function(ctx)
    ctx.state.idle:cancel()
    ctx:fire_inactive()
  end,
}

describe("a line stage on the in-memory channel", function()
  after_each(function() assert.no_leaks() end)

  it("answers PING and passes other lines on, however the bytes are split", function()
    local ch = testing.channel{ lines, pong }
    ch:write_inbound("PI", "NG\nhel", "lo\n")
    assert.outbound(ch, "PONG\n")
    assert.are.equal("hello", ch:read_inbound())
    assert.is_nil(ch:read_inbound())
    assert.is_false(ch:finish())           -- nothing unread, nothing leaked
  end)

  it("closes the connection after 1000 ms without a line, on the virtual clock", function()
    local ch = testing.channel{ lines, pong }
    ch:advance_time(999)
    ch:write_inbound("PING\n")             -- restarts the timer
    assert.outbound(ch, "PONG\n")          -- read before a close drops it
    ch:advance_time(999)
    assert.is_true(ch:is_open())
    ch:advance_time(1)
    assert.is_false(ch:is_open())
    assert.are.equal("idle", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("closes with frame_too_large when a line passes 64 bytes", function()
    local ch = testing.channel{ lines, pong }
    ch:write_inbound(string.rep("x", 65))
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("releases each buffer after the handler of simple_inbound", function()
    local seen = {}
    local ch = testing.channel{ sluice.simple_inbound(function(ctx, buf)
      seen[#seen + 1] = buf:tostring()     -- no release: simple_inbound does it
    end) }
    ch:write_inbound("a", "b")
    assert.are.same({ "a", "b" }, seen)
    assert.is_false(ch:finish())           -- raises on a leak
  end)
end)

-- Rules of docs/lua-api.md that these prove.
describe("events between Lua stages", function()
  after_each(function() assert.no_leaks() end)

  it("are direct calls: the next stage has handled the event when fire_read returns", function()
    local order = {}
    local first = { channel_read = function(ctx, buf)
      order[#order + 1] = "first"
      ctx:fire_read(buf)
      order[#order + 1] = "first again"
    end }
    local second = { channel_read = function(ctx, buf)
      order[#order + 1] = "second"
      buf:release()
    end }
    local ch = testing.channel{ first, second }
    ch:write_inbound("x")
    assert.are.same({ "first", "second", "first again" }, order)
    assert.is_false(ch:finish())
  end)

  it("a stage that raises ends the whole event: the stages that called it do not resume", function()
    local resumed = false
    local first = { channel_read = function(ctx, buf)
      ctx:fire_read(buf)
      resumed = true
    end }
    local second = { channel_read = function() error("bad frame") end }
    local ch = testing.channel{ first, second }
    ch:write_inbound("x")                  -- second still owned the buffer: released
    assert.is_false(resumed)
    assert.is_false(ch:is_open())
    assert.matches("failed: .*bad frame", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("a handle passed on belongs to the next stage: the sender cannot pass it again", function()
    local first = { channel_read = function(ctx, buf)
      ctx:fire_read(buf)
      ctx:fire_read(buf)                   -- wrong: the next stage owns it now
    end }
    local ch = testing.channel{ first, { channel_read = function(ctx, buf) ctx:write(buf) end } }
    ch:write_inbound("x")
    assert.matches("buffer passed on by a stage that does not own it", ch:close_reason(), 1, true)
    assert.is_false(ch:finish())
  end)

  it("a message that is not a buffer is dropped where a C stage is next", function()
    local ch = testing.channel{
      { channel_read = function(ctx, buf)
        buf:release()
        ctx:fire_read({ kind = "frame" })  -- the echo stage is written in C
      end },
      "sluice.stages.echo",
    }
    ch:write_inbound("x")
    assert.is_true(ch:is_open())
    assert.are.equal("", ch:outbound_string())
    assert.is_false(ch:finish())
  end)
end)
