-- sluice.codec.decoder: Netty's ByteToMessageDecoder, run through the
-- in-memory channel.
local testing = require("sluice.testing")
local codec = require("sluice.codec")

-- 2-byte big-endian length, then the payload: fired as a retained slice.
local function length_prefixed(opts)
  return codec.decoder(function(ctx, cum, out)
    if #cum < 2 then return end
    local n = cum:get_u16be(cum:reader_index())
    if #cum < 2 + n then return end
    cum:skip(2)
    out[#out + 1] = cum:read_slice(n):retain()
  end, opts)
end

local function frame(s) return string.char(math.floor(#s / 256), #s % 256) .. s end

local collect = function(into)
  return { channel_read = function(ctx, m)
    into[#into + 1] = m:tostring()
    m:release()
  end }
end

describe("sluice.codec.decoder", function()
  after_each(function() assert.no_leaks() end)

  it("decodes frames split at every byte the same as whole", function()
    local stream = frame("hello") .. frame("") .. frame(string.rep("x", 300)) .. frame("end")
    for _, step in ipairs({ 1, 2, 3, 7, 64, #stream }) do
      local got = {}
      local ch = testing.channel{ length_prefixed(), collect(got) }
      for i = 1, #stream, step do ch:write_inbound(stream:sub(i, i + step - 1)) end
      assert.are.same({ "hello", "", string.rep("x", 300), "end" }, got)
      assert.is_false(ch:finish())
    end
  end)

  it("keeps slices of the cumulation valid while more bytes arrive", function()
    local kept = {}
    local keep = { channel_read = function(ctx, m) kept[#kept + 1] = m end }
    local ch = testing.channel{ length_prefixed(), keep }
    ch:write_inbound(frame("first") .. frame("sec"))
    ch:write_inbound(string.char(0))
    ch:write_inbound(string.char(3) .. "abc")
    assert.are.equal(3, #kept)
    assert.are.equal("first", kept[1]:tostring())
    assert.are.equal("abc", kept[3]:tostring())
    for _, m in ipairs(kept) do m:release() end
    assert.is_false(ch:finish())
  end)

  it("closes with frame_too_large when the cumulation passes its limit", function()
    local ch = testing.channel{ length_prefixed({ max_cumulation = 64 }) }
    ch:write_inbound(string.char(1, 0) .. string.rep("y", 40))
    assert.is_true(ch:is_open())
    ch:write_inbound(string.rep("y", 40))
    assert.is_false(ch:is_open())
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("decodes what is left when the channel goes inactive, then releases it", function()
    local got = {}
    local last = codec.decoder(function(ctx, cum, out)
      local s = cum:read_bytes(#cum)
      out[#out + 1] = s:upper()
    end)
    local ch = testing.channel{ last, { channel_read = function(ctx, m) got[#got + 1] = m end } }
    ch:write_inbound("abc")
    assert.are.same({ "ABC" }, got)
    assert.is_false(ch:finish())
  end)

  it("passes the bytes it holds to the next stage when it is removed", function()
    local got = {}
    local dec = length_prefixed()
    local ch = testing.channel{ dec, collect(got) }
    ch:write_inbound(frame("one") .. string.char(0, 9) .. "part")
    assert.are.same({ "one" }, got)
    -- a stage removes the decoder while it holds "\0\9part"
    local c = require("sluice.host")
    for _, ctx in pairs(c.contexts) do
      if ctx.mod == dec then ctx:pipeline():remove(ctx.name) end
    end
    ch:run_pending()
    assert.are.same({ "one", string.char(0, 9) .. "part" }, got)
    assert.is_false(ch:finish())
  end)

  it("raises when decode_fn produces without reading, closing the connection", function()
    local bad = codec.decoder(function(ctx, cum, out) out[#out + 1] = "x" end)
    local ch = testing.channel{ bad }
    ch:write_inbound("abc")
    assert.is_false(ch:is_open())
    assert.matches("without reading", ch:close_reason())
    ch:finish()
  end)

  it("passes messages that are not buffers through", function()
    local tag = { channel_read = function(ctx, m) m:release(); ctx:fire_read({ tag = true }) end }
    local ch = testing.channel{ tag, length_prefixed() }
    ch:write_inbound("z")
    assert.are.same({ tag = true }, ch:read_inbound())
    assert.is_false(ch:finish())
  end)
end)

describe("sluice.codec.decoder at the end of input", function()
  after_each(function() assert.no_leaks() end)

  -- Lines; at the end of input the last line may lack its newline.
  local lines = codec.decoder(function(ctx, cum, out, last)
    local i = cum:find("\n", cum:reader_index())
    if i then
      out[#out + 1] = cum:read_bytes(i - cum:reader_index() + 1)
    elseif last and #cum > 0 then
      out[#out + 1] = cum:read_bytes(#cum)
    end
  end)

  it("decodes the rest with last = true when the peer half-closes, then passes the event on", function()
    local events = {}
    local ch = testing.channel{ lines }
    ch:write_inbound("one\ntw")
    assert.are.equal("one\n", ch:read_inbound())
    ch:fire_user_event("input_closed")
    assert.are.equal("tw", ch:read_inbound())
    assert.are.same({ "input_closed" }, ch.events)
    assert.is_false(ch:finish())
  end)

  it("takes its limits from the stage's options when it was given none", function()
    local dec = codec.decoder(function() end)
    package.preload["spec.fixtures.limited_decoder"] = function() return dec end
    local ch = testing.channel{ dec }
    ch:write_inbound(string.rep("a", 2048)) -- the default limit (1 MiB) holds these
    assert.is_true(ch:is_open())
    assert.is_false(ch:finish())
    local limited = testing.channel{ { "spec.fixtures.limited_decoder", max_cumulation = 100 } }
    limited:write_inbound(string.rep("b", 200))
    assert.are.equal("frame_too_large", limited:close_reason())
    assert.is_false(limited:finish())
  end)

  it("keeps its state apart from ctx.state", function()
    local seen
    local dec = codec.decoder(function(ctx, cum, out)
      seen = ctx.state.cum
      out[#out + 1] = cum:read_bytes(#cum)
    end)
    local ch = testing.channel{ dec }
    ch:write_inbound("z")
    assert.is_nil(seen)
    assert.are.equal("z", ch:read_inbound())
    assert.is_false(ch:finish())
  end)
end)
