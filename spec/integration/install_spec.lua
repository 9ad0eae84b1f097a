-- The installed layout: `cmake --install` into a fresh prefix gives a binary
-- that finds its Lua library and stage modules in PREFIX/share/sluice (not
-- in the source tree it was built from), and a Lua library that busted specs
-- load, with the core library from PREFIX/lib, from any folder.
local H = require("helpers")

local build = H.bin:match("^(.*)/[^/]+$")

-- The environment of a process that must not see the source tree: no
-- SLUICE_ROOT, no SLUICE_CORE_LIB; a sanitizer build's runtime preloaded
-- for LuaJIT (the sluice binary links it itself).
local function clean_env()
  local env = "env -u SLUICE_ROOT -u SLUICE_CORE_LIB -u LUA_PATH"
  local ldd = H.sh("ldd " .. H.shq(build .. "/libsluice_core.so"))
  if ldd:find("libasan", 1, true) then
    local asan = H.sh("gcc -print-file-name=libasan.so"):gsub("%s+$", "")
    local ubsan = H.sh("gcc -print-file-name=libubsan.so"):gsub("%s+$", "")
    env = ("%s LD_PRELOAD=%s:%s ASAN_OPTIONS=detect_leaks=0"):format(env, asan, ubsan)
  end
  return env
end

describe("an installed sluice", function()
  local prefix, peers = nil, H.killed_after_each()

  setup(function()
    prefix = H.tmpfile("prefix")
    local out, rc = H.sh(("cmake --install %s --prefix %s 2>&1"):format(H.shq(build),
                                                                          H.shq(prefix)))
    assert(rc == 0, "cmake --install failed:\n" .. out)
  end)

  it("says where its Lua library is: the installed one", function()
    local out, rc = H.sh(("cd / && %s %s/bin/sluice --version"):format(clean_env(), H.shq(prefix)))
    assert.are.equal(0, rc, out)
    assert.matches("Lua library: " .. prefix:gsub("%p", "%%%0") .. "/share/sluice/lua\n", out)
  end)

  it("runs stage modules from its installed tree", function()
    -- A module that exists only in the installed tree: found there, or
    -- the start fails.
    local only = prefix .. "/share/sluice/examples/stages/installed_only.lua"
    local f = assert(io.open(only, "wb"))
    -- (It follows a Lua stage that passes strings on.)
    f:write([[return { channel_read = function(ctx, s) ctx:fire_read("installed:" .. s) end }]])
    f:close()
    local port = H.free_port()
    local cfg = H.tmpfile("installed.lua", ([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { "examples.stages.upper", "examples.stages.installed_only",
                               "sluice.stages.echo" } } },
}
]]):format(port))
    local p = H.spawn(("cd / && %s %s %s/bin/sluice -c %s"):format(clean_env(), H.wrapper,
                      H.shq(prefix), H.shq(cfg)), "sluice")
    peers[#peers + 1] = p
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("started with", 1, true) or not H.alive(p)
    end, 30), H.read(p.log))
    local _, rc, out = H.exchange(port, "hello\n", 10)
    assert.are.equal(0, rc)
    assert.are.equal("installed:HELLO\n", H.read(out))
    H.stop_sluice(p)
  end)

  it("gives busted specs its Lua library and core library from the prefix", function()
    local share = prefix .. "/share/sluice/lua"
    local script = H.tmpfile("embedded.lua", [[
local testing = require("sluice.testing")
local ch = testing.channel{ "sluice.stages.echo" }
ch:write_inbound("ping")
io.write(ch:outbound_string())
assert(not ch:finish())
]])
    local errs = H.tmpfile("embedded.err")
    local out, rc = H.sh(("cd / && %s LUA_PATH=%s luajit %s 2>%s"):format(clean_env(),
      H.shq(share .. "/?.lua;" .. share .. "/?/init.lua;;"), H.shq(script), H.shq(errs)))
    assert.are.equal(0, rc, H.read(errs))
    assert.are.equal("ping", out, H.read(errs))
  end)
end)
