-- The C frame codecs on sluice.testing's in-memory channel, given with their
-- options exactly as in a configuration: frames are retained buffers the
-- reader owns, failures close the channel with their reason, bad options
-- are refused when the channel is built.
local testing = require("sluice.testing")
local H = require("helpers")

describe("codecs on the in-memory channel", function()
  H.with_pool()

  local function frames(ch)
    local out = {}
    while true do
      local m = ch:read_inbound()
      if m == nil then break end
      assert.are.equal(1, m:refcnt()) -- each frame counts for itself
      out[#out + 1] = m:tostring()
      m:release()
    end
    return out
  end

  it("sluice.codec.line splits reads into lines, in any chunking", function()
    local ch = testing.channel{ { "sluice.codec.line", max_length = 8 } }
    ch:write_inbound("ab\r", "\ncd\n\nef")
    assert.are.same({ "ab", "cd", "" }, frames(ch))
    ch:write_inbound("gh\n")
    assert.are.same({ "efgh" }, frames(ch))
    assert.is_false(ch:finish())
  end)

  it("a frame kept after the read holds only itself; its buffer goes back with it", function()
    local ch = testing.channel{ { "sluice.codec.fixed_length", frame_length = 3 } }
    ch:write_inbound("abcdefg")
    local a, b = ch:read_inbound(), ch:read_inbound()
    assert.are.same({ "abc", "def" }, { a:tostring(), b:tostring() })
    a:release()
    ch:write_inbound("hi")
    local c = ch:read_inbound()
    assert.are.equal("ghi", c:tostring())
    assert.are.equal("def", b:tostring()) -- still readable: it holds its memory
    b:release()
    c:release()
    assert.is_false(ch:finish())
  end)

  it("an oversized line closes the channel with frame_too_large after the lines before it", function()
    local ch = testing.channel{ { "sluice.codec.line", max_length = 4 } }
    ch:write_inbound("ok\n0123456789\nlater\n")
    assert.are.same({ "ok" }, frames(ch))
    assert.is_false(ch:is_open())
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.are.same({ "frame_too_large" }, ch.errors)
    assert.is_false(ch:finish())
  end)

  it("a malformed length closes the channel with malformed_frame", function()
    local ch = testing.channel{ { "sluice.codec.length_field", max_frame_length = 100,
                                  length_field_length = 1, length_adjustment = -5 } }
    ch:write_inbound("\2ab")
    assert.are.equal("malformed_frame", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("a length field decoder and prepender: frames in, length fields out", function()
    local ch = testing.channel{
      { "sluice.codec.length_field", max_frame_length = 1024, length_field_length = 2,
        initial_bytes_to_strip = 2 },
      { "sluice.codec.length_field_prepender", length_field_length = 2, byte_order = "little" },
    }
    ch:write_inbound("\0\5hel", "lo\0\1!")
    assert.are.same({ "hello", "!" }, frames(ch))
    ch:write_outbound("pong")
    assert.are.equal("\4\0pong", ch:outbound_string())
    assert.is_false(ch:finish())
  end)

  it("a frame a stage keeps past its connection is reported and taken back, once", function()
    local kept = {}
    local keeper = { channel_read = function(_, frame) kept[#kept + 1] = frame end }
    local ch = testing.channel{ { "sluice.codec.line", max_length = 8 }, keeper }
    ch:write_inbound("abc\nde")
    assert.are.equal(1, #kept)
    local ok, err = pcall(ch.finish, ch)
    assert.is_false(ok)
    -- outstanding: the frame, and the block under it
    assert.matches("2 buffers (16 bytes) still outstanding", err, 1, true)
    assert.matches("LEAK: retained view of 3 bytes was not released before its connection was "
                   .. "closed", err, 1, true)
    local _, n = err:gsub("LEAK:", "")
    assert.are.equal(1, n) -- the frame; its cumulation answered to it, not leaked itself
    assert.has_error(function() return kept[1]:tostring() end)
  end)

  it("a stage switches protocols: it adds a line codec with options while running", function()
    local switch = {
      channel_read = function(ctx, b)
        if b:tostring() == "LINES\n" then
          b:release()
          ctx:pipeline():add_after(ctx.name, { "sluice.codec.line", max_length = 8 })
          ctx:pipeline():remove(ctx.name)
          return
        end
        ctx:fire_read(b)
      end,
    }
    local ch = testing.channel{ switch }
    ch:write_inbound("LINES\n")
    ch:write_inbound("ab\ncd", "\n")
    assert.are.same({ "ab", "cd" }, frames(ch))
    ch:write_inbound("toolongline\n")
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.is_false(ch:finish())
    local bad = testing.channel{ {
      channel_read = function(ctx, b)
        b:release()
        local ok, err = pcall(ctx:pipeline().add_after, ctx:pipeline(), ctx.name,
                              { "sluice.codec.line", max_length = -1 })
        ctx:fire_read(ok and "added" or err)
      end,
    } }
    bad:write_inbound("x")
    assert.matches('cannot add stage "sluice.codec.line": max_length: expected a positive '
                   .. "integer, got -1", bad:read_inbound(), 1, true)
    assert.is_false(bad:finish())
  end)

  it("refuses bad options when the channel is built, with the key and what was expected", function()
    local ok, err = pcall(testing.channel, { "sluice.stages.echo", { "sluice.codec.line" } })
    assert.is_false(ok)
    assert.matches("stage 2 (sluice.codec.line): max_length: expected a positive integer, got nil",
                   err, 1, true)
    ok, err = pcall(testing.channel, { { "sluice.codec.delimiter", delimiters = { "" },
                                         max_frame_length = 4 } })
    assert.is_false(ok)
    assert.matches("delimiters: expected a non-empty list of non-empty strings, got a table",
                   err, 1, true)
  end)
end)
