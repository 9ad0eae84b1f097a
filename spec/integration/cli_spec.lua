-- The command line: --version, --help, --check, bad configs, signals.
local H = require("helpers")

local function config_with(listen_port)
  return ([[
return {
  listeners = {
    { name = "echo", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
  },
}
]]):format(listen_port)
end

describe("sluice command line", function()
  it("prints its version", function()
    local out, rc = H.sh(H.shq(H.bin) .. " --version")
    assert.are.equal(0, rc)
    assert.matches("^sluice %d+%.%d+%.%d+\nLua library: [^\n]+/lua\n$", out)
  end)

  it("prints usage with --help, and exits 2 on an unknown option", function()
    local out, rc = H.sh(H.shq(H.bin) .. " --help")
    assert.are.equal(0, rc)
    assert.matches("sluice %-c FILE", out)
    local _, rc2 = H.sh(H.shq(H.bin) .. " --frobnicate 2>/dev/null")
    assert.are.equal(2, rc2)
  end)

  it("--check accepts a valid config and starts nothing", function()
    local port = H.free_port()
    local cfg = H.tmpfile("ok.lua", config_with(port))
    local out, rc = H.sh(H.shq(H.bin) .. " --check " .. H.shq(cfg))
    assert.are.equal(0, rc)
    assert.matches("config ok", out)
    assert.is_false(H.port_open(port))
  end)

  it("exits 2 with the key path and what was expected on a bad config", function()
    local cfg = H.tmpfile("bad.lua", [[
return { listeners = { { name = "front", listen = 7000, pipeline = { "sluice.stages.echo" } } } }
]])
    for _, flag in ipairs({ "--check", "-c" }) do
      local out, rc = H.sh(("%s %s %s 2>&1"):format(H.shq(H.bin), flag, H.shq(cfg)))
      assert.are.equal(2, rc)
      assert.are.equal('config error: listeners[1].listen: expected "host:port", got 7000\n', out)
    end
  end)

  it("exits 2 on what the start would refuse: an IPv4-mapped listen address, a table that raises", function()
    local mapped = H.tmpfile("mapped.lua", [[
return { listeners = { { name = "b", listen = "[::ffff:127.0.0.1]:27101", pipeline = { "sluice.stages.echo" } } } }
]])
    local raises = H.tmpfile("raises.lua", [[
return setmetatable({}, { __index = function() error("x") end })
]])
    for _, flag in ipairs({ "--check", "-c" }) do
      local out, rc = H.sh(("%s %s %s 2>&1"):format(H.shq(H.bin), flag, H.shq(mapped)))
      assert.are.equal(2, rc)
      assert.are.equal('config error: listeners[1].listen: expected "host:port" with an IPv4 address '
                       .. 'written as itself, not IPv4-mapped (write "127.0.0.1:27101"), got '
                       .. '"[::ffff:127.0.0.1]:27101"\n', out)
      out, rc = H.sh(("%s %s %s 2>&1"):format(H.shq(H.bin), flag, H.shq(raises)))
      assert.are.equal(2, rc)
      assert.are.equal(("config error: %s:1: x (raised by the __index metamethod of a configuration "
                        .. "table during validation)\n"):format(raises), out)
    end
  end)

  it("exits 2 on a defer_accept that is not a boolean, and accepts a boolean", function()
    local bad = H.tmpfile("defer.lua", [[
return { listeners = { { name = "front", listen = "127.0.0.1:1", pipeline = { "sluice.stages.echo" },
                         defer_accept = 1 } } }
]])
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(bad)))
    assert.are.equal(2, rc)
    assert.are.equal("config error: listeners[1].defer_accept: expected a boolean, got 1\n", out)
    local good = H.tmpfile("defer_ok.lua", (H.read(bad):gsub("defer_accept = 1", "defer_accept = true")))
    out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(good)))
    assert.are.equal(0, rc, out)
    assert.matches("config ok", out)
  end)

  it("exits 2 naming a pipeline module that does not exist", function()
    local cfg = H.tmpfile("nomod.lua", [[
return { listeners = { { name = "front", listen = "127.0.0.1:1", pipeline = { "examples.nope" } } } }
]])
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal('config error: listeners[1].pipeline[1]: module "examples.nope" not found\n', out)
  end)

  it("exits 2 naming a Lua stage's bad option, as the stage's check_options says", function()
    local cfg = H.tmpfile("badopt.lua", [[
return { listeners = { { name = "front", listen = "127.0.0.1:1", upstream = "r",
  pipeline = { { "examples.redis_guard", deny = "FLUSHALL" } } } },
  upstreams = { r = { servers = { "127.0.0.1:6379" } } } }
]])
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal('config error: listeners[1].pipeline[1].deny: expected a list of command names, '
                     .. 'got "FLUSHALL"\n', out)
  end)

  it("takes --check with -c as well as with the file alone", function()
    local cfg = H.root .. "/examples/quickstart.lua"
    for _, args in ipairs({ "--check " .. H.shq(cfg), "--check -c " .. H.shq(cfg),
                            "-c " .. H.shq(cfg) .. " --check" }) do
      local out, rc = H.sh(("%s %s 2>&1"):format(H.shq(H.bin), args))
      assert.are.equal(0, rc, args)
      assert.matches("^config ok: ", out)
    end
    local _, rc = H.sh(("%s --check 2>&1"):format(H.shq(H.bin)))
    assert.are.equal(2, rc)
  end)

  it("exits 2 saying so when given a stage module instead of a config", function()
    local out, rc = H.sh(("%s --check %s 2>&1"):format(H.shq(H.bin),
                                                       H.shq(H.root .. "/examples/redis_guard.lua")))
    assert.are.equal(2, rc)
    assert.matches("^config error: top level: expected a configuration table, got a stage module", out)
  end)

  it("exits 2 on a config that never finishes, naming the file", function()
    local cfg = H.tmpfile("spins.lua", "while true do pcall(function() while true do end end) end\n")
    -- `timeout` only bounds the spec; sluice gives up on its own long before.
    local out, rc = H.sh(("timeout 120 %s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal(("config error: %s: still running after 100000000 Lua instructions "
                      .. "(a loop that never ends?)\n"):format(cfg), out)
  end)

  it("exits 2 on a bad environment value, with --check as with -c, and starts nothing", function()
    local port = H.free_port()
    local cfg = H.tmpfile("env.lua", config_with(port))
    local cases = {
      { "SLUICE_LOG_LEVEL=loud", 'sluice: SLUICE_LOG_LEVEL: expected debug, info, warn or error, got "loud"' },
      { "SLUICE_ALLOCATOR=slab", 'sluice: SLUICE_ALLOCATOR: expected pooled or unpooled, got "slab"' },
      { "SLUICE_LEAK_DETECTION=some", "sluice: SLUICE_LEAK_DETECTION: expected disabled, simple, "
                                      .. 'advanced or paranoid, got "some"' },
    }
    for _, case in ipairs(cases) do
      for _, flag in ipairs({ "--check", "-c" }) do
        local out, rc = H.sh(("env %s timeout 60 %s %s %s 2>&1"):format(case[1], H.shq(H.bin), flag,
                                                                       H.shq(cfg)))
        assert.are.equal(2, rc, case[1] .. " " .. flag .. ": " .. out)
        assert.are.equal(case[2] .. "\n", out)
      end
    end
    assert.is_false(H.port_open(port))
    -- Good values pass the check.
    local out, rc = H.sh(("env SLUICE_LOG_LEVEL=warn SLUICE_ALLOCATOR=unpooled "
                          .. "SLUICE_LEAK_DETECTION=paranoid %s --check %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    assert.are.equal(0, rc, out)
    assert.matches("^config ok", out)
  end)

  it("exits 2 in one line when SLUICE_ROOT does not hold sluice's Lua library", function()
    local cfg = H.tmpfile("root.lua", config_with(H.free_port()))
    local out, rc = H.sh(("env SLUICE_ROOT=/nonexistent %s --check %s 2>&1"):format(H.shq(H.bin),
                                                                                 H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.are.equal("config error: cannot load sluice.config from /nonexistent/lua (SLUICE_ROOT, "
                     .. "or the source folder sluice was built from): module 'sluice.config' not "
                     .. "found\n", out)
  end)

  it("exits 2 when the config file is missing", function()
    local out, rc = H.sh(H.shq(H.bin) .. " -c /nonexistent/sluice.lua 2>&1")
    assert.are.equal(2, rc)
    assert.matches("^config error: /nonexistent/sluice.lua: cannot open", out)
  end)

  it("exits 1 with the reason when a port cannot be bound", function()
    local port = H.free_port()
    local holder = H.start_echo(port)
    local cfg = H.tmpfile("busy.lua", config_with(port))
    local out, rc = H.sh(("%s -c %s 2>&1"):format(H.shq(H.bin), H.shq(cfg)))
    H.stop(holder)
    assert.are.equal(1, rc)
    assert.matches("cannot listen on 127.0.0.1:" .. port, out, 1, true)
  end)

  it("stops on SIGTERM with exit 0, closing open connections", function()
    local port = H.free_port()
    local p = H.start_sluice((config_with(port):gsub("^return {", "return { drain_timeout_ms = 200,")),
                             "SLUICE_LOG_LEVEL=debug")
    -- A client that stays connected: sluice must close it to exit.
    local client = H.spawn(("socat -T 30 EXEC:'sleep 30' TCP:127.0.0.1:%d"):format(port), "client")
    assert.truthy(H.wait_for(function() return H.read(p.log):find(" accepted", 1, true) end, 10))
    local log = H.stop_sluice(p)
    assert.matches("SIGTERM: stopping", log)
    assert.matches("on echo closed: shutdown", log, 1, true)
    H.stop(client, "KILL")
  end)

  it("stops on SIGINT with exit 0", function()
    local p = H.start_sluice(config_with(H.free_port()))
    local rc = H.stop(p, "INT")
    assert.are.equal(0, rc)
    assert.matches("pool clean at exit", H.read(p.log))
  end)
end)
