-- examples.line_rewrite on the in-memory channel.
local testing = require("sluice.testing")
local buf = require("sluice.buf")

local REWRITE = { "examples.line_rewrite", max_length = 64,
                  rules = { { match = "^PING", replace = "PONG" },
                            { match = "^USER (%w+)", replace = "USER guest-%1" },
                            { match = "secret", replace = "******" } } }

-- What reached the end of the pipeline, as one string; `kinds` collects
-- "buf" or "string" per message.
local function passed(ch, kinds)
  local parts = {}
  while true do
    local m = ch:read_inbound()
    if m == nil then break end
    if buf.is_buf(m) then
      parts[#parts + 1] = m:tostring()
      m:release()
      if kinds then kinds[#kinds + 1] = "buf" end
    else
      parts[#parts + 1] = m
      if kinds then kinds[#kinds + 1] = "string" end
    end
  end
  return table.concat(parts)
end

describe("examples.line_rewrite", function()
  after_each(function() assert.no_leaks() end)

  it("rewrites matching lines, keeps their endings, passes the others as slices", function()
    local ch = testing.channel{ REWRITE }
    ch:write_inbound("hello\nPING 1\r\nUSER bob\nmy secret secret\r\nbye\r\nsee\n")
    local kinds = {}
    assert.are.equal("hello\nPONG 1\r\nUSER guest-bob\nmy ****** ******\r\nbye\r\nsee\n",
                     passed(ch, kinds))
    assert.are.same({ "buf", "string", "string", "string", "buf" }, kinds)
    assert.is_false(ch:finish())
  end)

  it("gives the same bytes for a stream split at every byte", function()
    local stream = "a\r\nPING\r\n\r\n\nUSER x1 y\nsecret?\r\nxPING\n"
    local want = "a\r\nPONG\r\n\r\n\nUSER guest-x1 y\n******?\r\nxPING\n"
    for split = 0, #stream do
      local ch = testing.channel{ REWRITE }
      ch:write_inbound(stream:sub(1, split), stream:sub(split + 1))
      assert.are.equal(want, passed(ch))
      assert.is_false(ch:finish())
    end
    local ch = testing.channel{ REWRITE }
    for i = 1, #stream do ch:write_inbound(stream:sub(i, i)) end
    assert.are.equal(want, passed(ch))
    assert.is_false(ch:finish())
  end)

  it("holds a line until its end arrives, and drops an unfinished one at close", function()
    local ch = testing.channel{ REWRITE }
    ch:write_inbound("PING and more")
    assert.are.equal("", passed(ch))
    ch:write_inbound(" words\nPIN")
    assert.are.equal("PONG and more words\n", passed(ch))
    assert.is_false(ch:finish())
  end)

  it("closes with frame_too_large on a line longer than max_length", function()
    local ch = testing.channel{ REWRITE }
    ch:write_inbound("ok\n" .. string.rep("z", 65))
    assert.is_false(ch:is_open())
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.are.equal("ok\n", passed(ch))
    assert.is_false(ch:finish())
    ch = testing.channel{ REWRITE }
    ch:write_inbound(string.rep("z", 65) .. "\n")
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("closes the connection with the reason when a rule is broken", function()
    local ch = testing.channel{ { "examples.line_rewrite", rules = { { match = "[", replace = "" } } } }
    ch:write_inbound("x\n")
    assert.is_false(ch:is_open())
    assert.matches("rules%[1%]%.match: .*malformed pattern", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("answers through the echo stage behind it", function()
    local ch = testing.channel{ REWRITE, "sluice.stages.echo" }
    ch:write_inbound("PING\r\nUSER ann\r\n")
    assert.outbound(ch, "PONG\r\nUSER guest-ann\r\n")
    assert.is_false(ch:finish())
  end)
end)
