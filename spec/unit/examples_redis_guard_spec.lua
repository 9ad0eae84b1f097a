-- examples.redis_guard on the in-memory channel: what the client sends is
-- written inbound (what reaches the end of the pipeline is what the server
-- would get), and the server's replies are written outbound (what comes out
-- of the head is what the client gets).
local testing = require("sluice.testing")
local buf = require("sluice.buf")

local GUARD = { "examples.redis_guard", deny = { "FLUSHALL", "keys" } }

local resp = require("resp").command

local function denied(name) return "-ERR command '" .. name .. "' is not allowed\r\n" end

-- Everything that reached the server side, as one string (buffers released).
local function to_server(ch)
  local parts = {}
  while true do
    local m = ch:read_inbound()
    if m == nil then break end
    assert.is_true(buf.is_buf(m))
    parts[#parts + 1] = m:tostring()
    m:release()
  end
  return table.concat(parts)
end

-- Feeds `stream` in chunks of `step` bytes (0: every split into two pieces is
-- tried by the caller).
local function feed(ch, stream, step)
  for i = 1, #stream, step do ch:write_inbound(stream:sub(i, i + step - 1)) end
end

describe("examples.redis_guard", function()
  after_each(function() assert.no_leaks() end)

  it("passes allowed commands through as one slice of the client's bytes", function()
    local ch = testing.channel{ GUARD }
    local stream = resp("SET", "k", "v") .. resp("GET", "k") .. "PING\r\n"
    ch:write_inbound(stream)
    local m = ch:read_inbound()
    assert.are.equal(stream, m:tostring())
    assert.are_not.equal(m.b, m.b.root) -- a view into the cumulation: no copy
    m:release()
    assert.is_nil(ch:read_inbound())
    assert.outbound(ch, "")
    assert.is_false(ch:finish())
  end)

  it("answers a denied command itself, in any case, RESP or inline", function()
    local ch = testing.channel{ GUARD }
    ch:write_inbound(resp("flushall"))
    assert.outbound(ch, denied("FLUSHALL"))
    ch:write_inbound("keys *\r\n")
    assert.outbound(ch, denied("KEYS"))
    ch:write_inbound(resp("FlushAll", "ASYNC"))
    assert.outbound(ch, denied("FLUSHALL"))
    assert.are.equal("", to_server(ch))
    assert.is_false(ch:finish())
  end)

  it("reads an inline command's name as redis-server does: quotes and escapes", function()
    local ch = testing.channel{ GUARD }
    for _, line in ipairs({ '"\\x46LUSHALL"', "'flushall' async", 'FLUSH"ALL"', '"flush\\x61ll"',
                            "\t  flushall", "'key\\'s'" }) do
      ch:write_inbound(line .. "\r\n")
    end
    assert.outbound(ch, denied("FLUSHALL"):rep(5))
    assert.are.equal("'key\\'s'\r\n", to_server(ch)) -- KEY'S is not KEYS
    ch:write_outbound("-ERR unknown command\r\n")
    ch:write_inbound('"FLUSHALL\r\n' .. 'FLUSHALL"x\r\n' .. "'keys\r\n") -- unbalanced quotes
    assert.outbound(ch, "-ERR unknown command\r\n")
    assert.are.equal('"FLUSHALL\r\n' .. 'FLUSHALL"x\r\n' .. "'keys\r\n", to_server(ch))
    assert.is_false(ch:finish())
  end)

  it("decodes pipelined commands split at every byte the same as whole", function()
    local stream = resp("SET", "key:1", string.rep("x", 100)) .. "PING\n" .. resp("KEYS", "*")
                   .. resp("GET", "key:1") .. "\r\n" .. resp("DEL", "a", "b", "c") .. "keys a*\r\n"
    local want_server = resp("SET", "key:1", string.rep("x", 100)) .. "PING\n"
                        .. resp("GET", "key:1") .. "\r\n" .. resp("DEL", "a", "b", "c")
    local function check(chunks)
      local ch = testing.channel{ GUARD }
      for _, c in ipairs(chunks) do ch:write_inbound(c) end
      assert.are.equal(want_server, to_server(ch))
      -- the replies of SET and PING come first, then the local one, ...
      ch:write_outbound("+OK\r\n+PONG\r\n$100\r\n" .. string.rep("x", 100) .. "\r\n:3\r\n")
      assert.outbound(ch, "+OK\r\n+PONG\r\n" .. denied("KEYS") .. "$100\r\n"
                          .. string.rep("x", 100) .. "\r\n:3\r\n" .. denied("KEYS"))
      assert.is_false(ch:finish())
    end
    for split = 1, #stream - 1 do check({ stream:sub(1, split), stream:sub(split + 1) }) end
    local bytes = {}
    for i = 1, #stream do bytes[i] = stream:sub(i, i) end
    check(bytes)
  end)

  it("keeps replies in request order: a denied command in the middle waits its turn", function()
    local replies = "+OK\r\n" .. "*2\r\n$1\r\na\r\n*1\r\n:1\r\n" .. "$-1\r\n" .. "%1\r\n+k\r\n:2\r\n"
                    .. "-WRONGTYPE no\r\n"
    local want = "+OK\r\n" .. "*2\r\n$1\r\na\r\n*1\r\n:1\r\n" .. denied("FLUSHALL") .. denied("KEYS")
                 .. "$-1\r\n" .. "%1\r\n+k\r\n:2\r\n" .. denied("FLUSHALL") .. "-WRONGTYPE no\r\n"
    local cmds = resp("SET", "a", "1") .. resp("LRANGE", "l", 0, -1) .. resp("FLUSHALL")
                 .. resp("KEYS", "*") .. resp("GET", "nope") .. resp("HGETALL", "h")
                 .. resp("FLUSHALL") .. resp("INCR", "l")
    for _, step in ipairs({ 1, 2, 3, 5, 8, 13, #replies }) do
      local ch = testing.channel{ GUARD }
      ch:write_inbound(cmds)
      assert.outbound(ch, "") -- nothing is due before the server's first reply
      assert.are.equal(resp("SET", "a", "1") .. resp("LRANGE", "l", 0, -1) .. resp("GET", "nope")
                       .. resp("HGETALL", "h") .. resp("INCR", "l"), to_server(ch))
      for i = 1, #replies, step do ch:write_outbound(replies:sub(i, i + step - 1)) end
      assert.outbound(ch, want)
      assert.is_false(ch:finish())
    end
  end)

  it("answers at once when nothing is owed, and again after the server caught up", function()
    local ch = testing.channel{ GUARD }
    ch:write_inbound(resp("FLUSHALL") .. resp("GET", "a"))
    assert.outbound(ch, denied("FLUSHALL"))
    ch:write_outbound("$1\r\nx\r\n")
    assert.outbound(ch, "$1\r\nx\r\n")
    ch:write_inbound("\r\n" .. resp("KEYS", "*")) -- an empty command owes no reply
    assert.outbound(ch, denied("KEYS"))
    ch:write_outbound(">3\r\n+message\r\n+ch\r\n+hi\r\n") -- unexpected: passes through
    assert.outbound(ch, ">3\r\n+message\r\n+ch\r\n+hi\r\n")
    assert.are.equal(resp("GET", "a") .. "\r\n", to_server(ch))
    assert.is_false(ch:finish())
  end)

  for _, bad in ipairs({
    { "an array header that is not a number", "*x\r\n" },
    { "an element that is not a bulk string", "*1\r\n:1\r\n" },
    { "a negative bulk length", "*1\r\n$-2\r\n" },
    { "a bulk string without its CRLF", "*1\r\n$3\r\nabcd\r\n" },
    { "a header line without its end", "*1\r\n$" .. string.rep("9", 40) },
  }) do
    it("closes the connection with malformed_frame on " .. bad[1], function()
      local ch = testing.channel{ GUARD }
      ch:write_inbound(resp("GET", "a") .. bad[2])
      assert.is_false(ch:is_open())
      assert.are.equal("malformed_frame", ch:close_reason())
      assert.are.equal(resp("GET", "a"), to_server(ch)) -- the command before it went on
      assert.is_false(ch:finish())
    end)
  end

  it("closes the connection with malformed_frame when a reply is not RESP", function()
    local ch = testing.channel{ GUARD }
    ch:write_inbound(resp("GET", "a"))
    assert.are.equal(resp("GET", "a"), to_server(ch))
    ch:write_outbound("?what\r\n")
    assert.is_false(ch:is_open())
    assert.are.equal("malformed_frame", ch:close_reason())
    ch:finish()
  end)

  it("closes the connection with the reason when the deny option is not a list", function()
    local ch = testing.channel{ { "examples.redis_guard", deny = "FLUSHALL" } }
    ch:write_inbound(resp("PING"))
    assert.is_false(ch:is_open())
    assert.matches("option 'deny' must be a list", ch:close_reason())
    assert.is_false(ch:finish())
  end)

  it("releases a command cut short when the client goes away", function()
    local ch = testing.channel{ GUARD }
    ch:write_inbound(resp("SET", "k", string.rep("v", 5000)):sub(1, 3000))
    assert.is_nil(ch:read_inbound())
    assert.is_false(ch:finish())
  end)
end)
