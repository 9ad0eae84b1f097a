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
end)
