-- The RESP guard (examples/redis_guard.lua) on sluice.testing's in-memory
-- channel: pipelines of 16 commands, SET and GET alternating as
-- redis-benchmark sends them, in through the decoder and their replies out
-- through the stage's write; CPU time per command (command and reply).
-- Start it several times: LuaJIT's trace selection differs from one start
-- to the next, and a parser whose hot loop LuaJIT gives up on shows as an
-- outlier several times slower.
--
--   bench/lua/redis_guard.sh [COMMANDS]      (default 800000)
local testing = require("sluice.testing")

local resp = require("resp").command

local cmds, replies = {}, {}
for i = 1, 16 do
  if i % 2 == 0 then
    cmds[i], replies[i] = resp("GET", "key:__rand_int__"), "$3\r\nxxx\r\n"
  else
    cmds[i], replies[i] = resp("SET", "key:__rand_int__", "xxx"), "+OK\r\n"
  end
end
local chunk, reply_chunk = table.concat(cmds), table.concat(replies)

local ch = testing.channel{ { "examples.redis_guard", deny = { "FLUSHALL", "KEYS" } } }
local rounds = math.ceil((tonumber(arg[1]) or 800000) / 16)
local t0 = os.clock()
for _ = 1, rounds do
  ch:write_inbound(chunk)
  local m = ch:read_inbound()
  while m do
    m:release()
    m = ch:read_inbound()
  end
  ch:write_outbound(reply_chunk)
  local o = ch:read_outbound()
  while o do
    o:release()
    o = ch:read_outbound()
  end
end
print(("%.0f ns per command"):format((os.clock() - t0) / (rounds * 16) * 1e9))
assert(ch:finish() == false, "the guard left buffers behind")
