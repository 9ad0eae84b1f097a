-- examples.length_router on the in-memory channel: FORWARD frames reach the
-- end of the pipeline (the upstream's side), ECHO frames come back out of
-- the head (the client's side).
local testing = require("sluice.testing")
local buf = require("sluice.buf")

local ROUTER = { "examples.length_router", max_frame_length = 300 }

local function u32(n)
  return string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
                     math.floor(n / 256) % 256, n % 256)
end
local function frame(header, payload) return u32(1 + #payload) .. string.char(header) .. payload end
local function echo(p) return frame(0x01, p) end
local function forward(p) return frame(0x02, p) end

-- The frames that reached the end, each as a string (buffers released).
local function forwarded(ch)
  local got = {}
  while true do
    local m = ch:read_inbound()
    if m == nil then break end
    assert.is_true(buf.is_buf(m))
    got[#got + 1] = m:tostring()
    m:release()
  end
  return got
end

describe("examples.length_router", function()
  after_each(function() assert.no_leaks() end)

  it("answers ECHO frames itself and passes FORWARD frames on, as they came", function()
    local ch = testing.channel{ ROUTER }
    ch:write_inbound(echo("hello") .. forward("to the backend") .. echo("") .. forward(""))
    assert.outbound(ch, echo("hello") .. echo(""))
    assert.are.same({ forward("to the backend"), forward("") }, forwarded(ch))
    assert.is_false(ch:finish())
  end)

  it("routes a stream split at every byte the same as whole", function()
    local stream = forward("a") .. echo(string.rep("e", 200)) .. forward(string.rep("f", 299))
                   .. echo("x") .. forward("")
    local function check(chunks)
      local ch = testing.channel{ ROUTER }
      for _, c in ipairs(chunks) do ch:write_inbound(c) end
      assert.outbound(ch, echo(string.rep("e", 200)) .. echo("x"))
      assert.are.same({ forward("a"), forward(string.rep("f", 299)), forward("") }, forwarded(ch))
      assert.is_false(ch:finish())
    end
    for split = 1, #stream - 1 do check({ stream:sub(1, split), stream:sub(split + 1) }) end
    local bytes = {}
    for i = 1, #stream do bytes[i] = stream:sub(i, i) end
    check(bytes)
  end)

  for _, bad in ipairs({
    { "an unknown header byte", frame(0x07, "zz"), "malformed_frame" },
    { "a frame without a header byte", u32(0), "malformed_frame" },
    { "a frame over max_frame_length", u32(301), "frame_too_large" },
  }) do
    it("closes with " .. bad[3] .. " on " .. bad[1] .. ", after the frames before it", function()
      local ch = testing.channel{ ROUTER }
      ch:write_inbound(forward("first") .. bad[2] .. forward("never"))
      assert.is_false(ch:is_open())
      assert.are.equal(bad[3], ch:close_reason())
      assert.are.same({ forward("first") }, forwarded(ch))
      assert.is_false(ch:finish())
    end)
  end

  it("passes the upstream's answers on as whole frames, so that an ECHO answer never lands inside one",
     function()
    local answer = forward(string.rep("A", 40)) .. forward("B")
    for split = 1, #answer - 1 do
      local ch = testing.channel{ ROUTER }
      ch:write_outbound(answer:sub(1, split))            -- the upstream's first piece
      ch:write_inbound(echo("e"))                        -- an ECHO meanwhile
      ch:write_outbound(answer:sub(split + 1))
      local got = ch:outbound_string()
      local first = forward(string.rep("A", 40))
      local want = split < #first and echo("e") .. answer
                   or first .. echo("e") .. forward("B")
      assert.are.equal(want, got, "split at " .. split)
      assert.is_false(ch:finish())
    end
  end)

  it("drops an answer frame the upstream never finished, and closes on one too long", function()
    local ch = testing.channel{ ROUTER }
    ch:write_outbound(forward("whole") .. forward(string.rep("p", 100)):sub(1, 20))
    assert.are.equal(forward("whole"), ch:outbound_string())
    assert.is_false(ch:finish())
    ch = testing.channel{ ROUTER }
    ch:write_outbound(u32(301) .. "x")
    assert.is_false(ch:is_open())
    assert.are.equal("frame_too_large", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("releases a frame cut short when the client goes away", function()
    local ch = testing.channel{ ROUTER }
    ch:write_inbound(forward(string.rep("p", 250)):sub(1, 100))
    assert.are.same({}, forwarded(ch))
    assert.is_false(ch:finish())
  end)
end)
