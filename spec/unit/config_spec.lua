-- Unit tests for sluice.config: loading, validation, normalization and the
-- exact text of every kind of configuration error. No sockets, no binary.

local config = require("sluice.config")

local FIX = "spec/fixtures/config"
local ORDER = FIX .. "/order"
local OPTS = { config_dir = FIX, builtin = { ["sluice.stages.echo"] = true } }

local NONE = {}  -- marks a field to remove in listener()/upstream()

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[deep_copy(k)] = deep_copy(x) end
  return out
end

local function merge(base, fields)
  for k, v in pairs(fields or {}) do
    if v == NONE then base[k] = nil else base[k] = v end
  end
  return base
end

-- A valid listener, with `fields` replacing (or, with NONE, removing) keys.
local function listener(fields)
  return merge({ name = "front", listen = "127.0.0.1:7000", upstream = "demo" }, fields)
end

-- A valid configuration with the given listeners (default: one listener),
-- an upstream "demo", and top-level `fields` merged in.
local function conf(listeners, fields)
  return merge({
    upstreams = { demo = { servers = { "127.0.0.1:8000" } } },
    listeners = listeners or { listener() },
  }, fields)
end

-- Returns the error text of validating tbl (which must fail).
local function err_of(tbl, opts)
  local cfg, err = config.validate(tbl, opts or OPTS)
  assert.is_nil(cfg)
  assert.is_string(err)
  assert.is_nil(err:find("\n", 1, true), "error spans several lines: " .. err)
  return err
end

-- Returns the normalized table for tbl (which must validate).
local function ok_of(tbl, opts)
  local cfg, err = config.validate(tbl, opts or OPTS)
  assert.is_nil(err)
  assert.is_table(cfg)
  return cfg
end

local function addr(host, port, family)
  local text = family == "inet6" and ("[" .. host .. "]:" .. port) or (host .. ":" .. port)
  return { host = host, port = port, text = text, family = family or "inet" }
end

-- A normalized server: an address with its weight (1 unless given).
local function server(host, port, family, weight)
  local a = addr(host, port, family)
  a.weight = weight or 1
  return a
end

-- A normalized upstream with every default filled in, `fields` replacing keys.
local function upstream_defaults(name, servers, fields)
  return merge({ name = name, servers = servers, balance = "round_robin",
                 connect_timeout_ms = 5000, tries = #servers, max_fails = 1,
                 fail_timeout_ms = 10000, resolve_interval_ms = 30000, hosts = {} }, fields)
end

local ALLOCATOR_DEFAULTS = {
  type = "pooled", arenas = 0, page_size = 8192, chunk_size = 4194304, small_cache = 256,
  normal_cache = 64, max_cached = 32768, trim_interval = 8192, trim_idle_ms = 10000,
  max_memory = 0,
}

local CALLBACKS = "channel_active, channel_inactive, channel_read, channel_read_complete, "
  .. "channel_writability_changed, user_event, error, write, flush, close, read, added, removed, "
  .. "check_options"

describe("sluice.config", function()

  describe("search_path", function()
    it("puts the config folder, root/lua and root before package.path", function()
      assert.are.equal(
        "/etc/sluice/?.lua;/etc/sluice/?/init.lua;"
          .. "/opt/sluice/lua/?.lua;/opt/sluice/lua/?/init.lua;"
          .. "/opt/sluice/?.lua;/opt/sluice/?/init.lua;" .. package.path,
        config.search_path({ config_dir = "/etc/sluice", root = "/opt/sluice/" }))
    end)

    it("leaves out folders that are not given", function()
      assert.are.equal("cfg/?.lua;cfg/?/init.lua;" .. package.path,
                       config.search_path({ config_dir = "cfg" }))
      assert.are.equal(package.path, config.search_path({}))
    end)

    it("is part of the normalized configuration", function()
      assert.are.equal(config.search_path(OPTS), ok_of(conf()).search_path)
    end)
  end)

  describe("normalization", function()
    it("fills in every default", function()
      assert.are.same({
        log_level = "info",
        allocator = ALLOCATOR_DEFAULTS,
        leak_detection = { level = "simple", sample_rate = 128 },
        workers = 0, drain_timeout_ms = 10000, error_log = "stderr", access_log = "off", access_log_format = "logfmt", lua_memory_limit = 0, lua_timeout_ms = 5000, resolve_cache_ms = 30000,
        search_path = config.search_path(OPTS),
        listeners = {
          { name = "front", listen = addr("127.0.0.1", 7000), upstream = "demo",
            pipeline = {}, low_water_mark = 524288, high_water_mark = 1048576,
            outbound_limit = 16777216, write_spin_count = 16,
            max_connections = 0, max_connections_per_client = 0, max_connection_rate = 0, idle_timeout_ms = 0, write_timeout_ms = 0, connect_timeout_ms = 0,
            defer_accept = false, splice = "auto",
            half_close = true, half_close_timeout_ms = 0, tcp_keepalive = false, backlog = 511 },
        },
        upstreams = {
          demo = upstream_defaults("demo", { server("127.0.0.1", 8000) }),
        },
        upstream_names = { "demo" },
      }, ok_of(conf()))
    end)

    it("loads a complete file from the fixtures folder", function()
      local cfg, err = config.load(FIX .. "/valid.lua",
                                   { builtin = { ["sluice.stages.echo"] = true } })
      assert.is_nil(err)
      assert.are.same({
        log_level = "debug",
        allocator = ALLOCATOR_DEFAULTS,
        leak_detection = { level = "simple", sample_rate = 128 },
        workers = 0, drain_timeout_ms = 10000, error_log = "stderr", access_log = "off", access_log_format = "logfmt", lua_memory_limit = 0, lua_timeout_ms = 5000, resolve_cache_ms = 30000,
        search_path = config.search_path({ config_dir = FIX }),
        listeners = {
          { name = "front", listen = addr("127.0.0.1", 7000), upstream = "demo",
            pipeline = {
              { module = "stages.pass", kind = "lua", file = FIX .. "/stages/pass.lua",
                options = { label = "front" } },
            },
            low_water_mark = 524288, high_water_mark = 1048576,
            outbound_limit = 16777216, write_spin_count = 16,
            max_connections = 0, max_connections_per_client = 0, max_connection_rate = 0, idle_timeout_ms = 0, write_timeout_ms = 0, connect_timeout_ms = 0,
            defer_accept = false, splice = "auto",
            half_close = true, half_close_timeout_ms = 0, tcp_keepalive = false, backlog = 511 },
          { name = "echo", listen = addr("::1", 7002, "inet6"),
            pipeline = { { module = "sluice.stages.echo", kind = "c", options = {} } },
            low_water_mark = 1024, high_water_mark = 1024,
            outbound_limit = 16777216, write_spin_count = 16,
            max_connections = 0, max_connections_per_client = 0, max_connection_rate = 0, idle_timeout_ms = 0, write_timeout_ms = 0, connect_timeout_ms = 0,
            defer_accept = false, splice = "auto",
            half_close = true, half_close_timeout_ms = 0, tcp_keepalive = false, backlog = 511 },
        },
        upstreams = {
          demo = upstream_defaults("demo", { server("127.0.0.1", 7001) }),
        },
        upstream_names = { "demo" },
      }, cfg)
    end)

    it("keeps explicit values", function()
      local cfg = ok_of(conf({
        listener({ low_water_mark = 100, high_water_mark = 200 }),
      }, {
        log_level = "warn",
        upstreams = {
          demo = { servers = { "10.0.0.1:80", "10.0.0.2:80" }, connect_timeout_ms = 250 },
          b = { servers = { "[2001:db8::1]:443" } },
          ["a-1.x"] = { servers = { "localhost:81" } },
        },
      }))
      assert.are.equal("warn", cfg.log_level)
      assert.are.equal(100, cfg.listeners[1].low_water_mark)
      assert.are.equal(200, cfg.listeners[1].high_water_mark)
      assert.are.same({ "a-1.x", "b", "demo" }, cfg.upstream_names)
      assert.are.same(upstream_defaults("demo", { server("10.0.0.1", 80), server("10.0.0.2", 80) },
                                        { connect_timeout_ms = 250 }),
                      cfg.upstreams.demo)
      assert.are.same({ server("2001:db8::1", 443, "inet6") }, cfg.upstreams.b.servers)
      assert.are.same({ server("127.0.0.1", 81) }, cfg.upstreams["a-1.x"].servers)
    end)

    it("keeps every upstream key, and weights on servers given as tables", function()
      local cfg = ok_of(conf(nil, { upstreams = { demo = {
        servers = { "127.0.0.1:6379", { "127.0.0.1:6380", weight = 2 }, { "[::1]:6381" } },
        balance = "least_conn", connect_timeout_ms = 300, tries = 2, max_fails = 3,
        fail_timeout_ms = 5000,
        health_check = { interval_ms = 500, timeout_ms = 200, fails = 2, passes = 1 },
      } } }))
      assert.are.same(upstream_defaults("demo",
        { server("127.0.0.1", 6379), server("127.0.0.1", 6380, "inet", 2),
          server("::1", 6381, "inet6") },
        { balance = "least_conn", connect_timeout_ms = 300, tries = 2, max_fails = 3,
          fail_timeout_ms = 5000,
          health_check = { interval_ms = 500, timeout_ms = 200, fails = 2, passes = 1 } }),
        cfg.upstreams.demo)
    end)

    it("fills in health_check defaults, with timeout_ms at most interval_ms", function()
      local function hc(h)
        return ok_of(conf(nil, { upstreams = { demo = { servers = { "127.0.0.1:1" },
                                                        health_check = h } } })).upstreams.demo.health_check
      end
      assert.are.same({ interval_ms = 2000, timeout_ms = 1000, fails = 3, passes = 2 }, hc({}))
      assert.are.same({ interval_ms = 300, timeout_ms = 300, fails = 3, passes = 2 },
                      hc({ interval_ms = 300 }))
      assert.are.same({ interval_ms = 2000, timeout_ms = 1000, fails = 3, passes = 2,
                        send = "PING\r\n", expect = "+PONG" },
                      hc({ send = "PING\r\n", expect = "+PONG" }))
      assert.is_nil(hc(nil))
      assert.are.same({ interval_ms = 2000, timeout_ms = 1000, fails = 3, passes = 2,
                        steps = { { send = "PING\r\n" }, { expect = "+PONG" },
                                  { expect_regex = "^role:master" } } },
                      hc({ steps = { { send = "PING\r\n" }, { expect = "+PONG" },
                                     { expect_regex = "^role:master" } } }))
    end)

    it("accepts every balance name, and max_fails 0", function()
      for _, b in ipairs({ "round_robin", "least_conn", "hash", "random_two" }) do
        local u = ok_of(conf(nil, { upstreams = { demo = { servers = { "127.0.0.1:1" }, balance = b,
                                                           max_fails = 0 } } })).upstreams.demo
        assert.are.equal(b, u.balance)
        assert.are.equal(0, u.max_fails)
      end
    end)

    it("lowers the default low_water_mark to an explicit, smaller high_water_mark", function()
      local l = ok_of(conf({ listener({ high_water_mark = 1000 }) })).listeners[1]
      assert.are.equal(1000, l.low_water_mark)
      assert.are.equal(1000, l.high_water_mark)
    end)

    it("normalizes localhost to 127.0.0.1", function()
      assert.are.same(addr("127.0.0.1", 7000),
                      ok_of(conf({ listener({ listen = "localhost:7000" }) })).listeners[1].listen)
    end)

    it("normalizes * to 0.0.0.0 and accepts 0.0.0.0 for a listener", function()
      assert.are.same(addr("0.0.0.0", 80),
                      ok_of(conf({ listener({ listen = "*:80" }) })).listeners[1].listen)
      assert.are.same(addr("0.0.0.0", 80),
                      ok_of(conf({ listener({ listen = "0.0.0.0:80" }) })).listeners[1].listen)
    end)

    it("accepts IPv6 in brackets and writes it in canonical form", function()
      local cases = {
        ["[::1]:7000"] = "::1",
        ["[::]:7000"] = "::",
        ["[2001:DB8:0:0:1:0:0:1]:7000"] = "2001:db8::1:0:0:1",
        ["[fe80:0000::0001]:7000"] = "fe80::1",
        ["[1:0:0:2:0:0:0:3]:7000"] = "1:0:0:2::3",
        ["[1:2:3:4:5:6:7::]:7000"] = "1:2:3:4:5:6:7:0",
        ["[64:ff9b::192.0.2.1]:7000"] = "64:ff9b::c000:201",
        ["[::ffff]:7000"] = "::ffff",
      }
      for listen, host in pairs(cases) do
        assert.are.same(addr(host, 7000, "inet6"),
                        ok_of(conf({ listener({ listen = listen }) })).listeners[1].listen)
      end
    end)

    it("passes stage options through", function()
      local nested = { "a", "b" }
      local entry = { "stages.pass", prefix = ">", count = 3, enabled = false, list = nested }
      local stage = ok_of(conf({ listener({ pipeline = { entry } }) })).listeners[1].pipeline[1]
      assert.are.same({ prefix = ">", count = 3, enabled = false, list = nested }, stage.options)
      assert.are.equal(nested, stage.options.list)       -- values are passed as they are
      assert.are_not.equal(entry, stage.options)         -- in a table of its own
    end)

    it("allows non-function fields in a stage module", function()
      local stage = ok_of(conf({ listener({ pipeline = { "stages.with_data" } }) }))
        .listeners[1].pipeline[1]
      assert.are.same({ module = "stages.with_data", kind = "lua",
                        file = FIX .. "/stages/with_data.lua", options = {} }, stage)
    end)

    it("accepts a pipeline without an upstream, and an empty pipeline with one", function()
      local cfg = ok_of(conf({
        listener({ name = "echo", listen = "127.0.0.1:1", upstream = NONE,
                   pipeline = { "sluice.stages.echo" } }),
        listener({ listen = "127.0.0.1:2", pipeline = {} }),
      }))
      assert.is_nil(cfg.listeners[1].upstream)
      assert.are.same({}, cfg.listeners[2].pipeline)
    end)

    it("accepts a configuration without upstreams", function()
      local cfg = ok_of({ listeners = { listener({ upstream = NONE,
                                                   pipeline = { "stages.pass" } }) } })
      assert.are.same({}, cfg.upstreams)
      assert.are.same({}, cfg.upstream_names)
    end)

    it("does not modify the input table", function()
      local input = conf({
        listener({ pipeline = { { "stages.pass", opt = { 1 } }, "sluice.stages.echo" } }),
        listener({ name = "b", listen = "localhost:7001", low_water_mark = 10 }),
      })
      local before = deep_copy(input)
      local cfg = ok_of(input)
      assert.are.same(before, input)
      assert.are_not.equal(input.listeners, cfg.listeners)
      assert.are_not.equal(input.listeners[1], cfg.listeners[1])
      assert.are_not.equal(input.upstreams, cfg.upstreams)
      assert.are_not.equal(input.upstreams.demo.servers, cfg.upstreams.demo.servers)
    end)
  end)

  describe("stage resolution", function()
    local opts = { config_dir = ORDER .. "/cfg", root = ORDER .. "/root",
                   builtin = { ["order.first"] = true, ["sluice.stages.echo"] = true } }

    local function stage(name, o)
      return ok_of(conf({ listener({ pipeline = { name } }) }), o or opts).listeners[1].pipeline[1]
    end

    it("prefers a C builtin to any Lua file of the same name", function()
      assert.are.same({ module = "order.first", kind = "c", options = {} }, stage("order.first"))
    end)

    it("looks in the config folder, then root/lua, then root", function()
      local lua_opts = { config_dir = opts.config_dir, root = opts.root }
      assert.are.equal(ORDER .. "/cfg/order/first.lua", stage("order.first", lua_opts).file)
      assert.are.equal(ORDER .. "/root/lua/order/second.lua", stage("order.second", lua_opts).file)
      assert.are.equal(ORDER .. "/root/order/third.lua", stage("order.third", lua_opts).file)
      assert.are.equal("lua", stage("order.third", lua_opts).kind)
    end)

    it("finds <name>/init.lua", function()
      assert.are.equal(ORDER .. "/root/lua/order/pkg/init.lua", stage("order.pkg").file)
    end)

    it("finds a module in the folder of the loaded file", function()
      local cfg, err = config.load(FIX .. "/pollutes.lua")
      assert.is_nil(err)
      assert.are.equal(FIX .. "/stages/pass.lua", cfg.listeners[1].pipeline[1].file)
    end)

    it("lets a module require a sibling through the search path", function()
      local saved = package.path
      local s = stage("stages.requires", OPTS)
      package.loaded["stages.pass"] = nil
      assert.are.equal(FIX .. "/stages/requires.lua", s.file)
      assert.are.equal(saved, package.path)
    end)

    it("does not let a module set globals", function()
      stage("stages.pollutes", OPTS)
      assert.is_nil(rawget(_G, "sluice_test_stage_leaked"))
    end)
  end)

  describe("load", function()
    it("reports a syntax error with the file's path", function()
      local cfg, err = config.load(FIX .. "/syntax_error.lua")
      assert.is_nil(cfg)
      assert.are.equal("config error: " .. FIX .. "/syntax_error.lua:3: '}' expected near 'listen'", err)
    end)

    it("reports an error raised by the file", function()
      local cfg, err = config.load(FIX .. "/raises.lua")
      assert.is_nil(cfg)
      assert.are.equal("config error: " .. FIX .. "/raises.lua:2: SLUICE_PORT is not set", err)
    end)

    it("reports a missing file", function()
      local cfg, err = config.load(FIX .. "/no_such_file.lua")
      assert.is_nil(cfg)
      assert.are.equal("config error: " .. FIX
        .. "/no_such_file.lua: cannot open file (No such file or directory)", err)
    end)

    it("requires the file to return a table", function()
      assert.are.same({ nil, "config error: top level: expected the file to return a table, got nil" },
                      { config.load(FIX .. "/returns_nothing.lua") })
      assert.are.same({ nil, 'config error: top level: expected the file to return a table, got "listeners"' },
                      { config.load(FIX .. "/returns_string.lua") })
    end)

    it("stops a file, a stage module or check_options that never finishes", function()
      local limit = { instruction_limit = 1000000 }
      local spin = "still running after 1000000 Lua instructions (a loop that never ends?)"
      assert.are.same({ nil, "config error: " .. FIX .. "/spins.lua: " .. spin },
                      { config.load(FIX .. "/spins.lua", limit) })
      local o = merge(deep_copy(OPTS), limit)
      assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.spins" failed to '
                       .. "load: " .. spin,
                       err_of(conf({ listener({ pipeline = { "stages.spins" } }) }), o))
      assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.spins_in_check" '
                       .. "raised in check_options: " .. spin,
                       err_of(conf({ listener({ pipeline = { "stages.spins_in_check" } }) }), o))
      local looping = setmetatable({}, { __index = function() while true do end end })
      assert.are.equal("config error: top level: " .. spin, err_of(looping, o))
      -- The default limit holds too, and the state is as it was.
      assert.are.equal("config error: " .. FIX .. "/spins.lua: still running after 100000000 Lua "
                       .. "instructions (a loop that never ends?)",
                       select(2, config.load(FIX .. "/spins.lua")))
      assert.is_true((jit.status()))
      assert.is_nil(debug.gethook())
      assert.is_table(config.load(FIX .. "/valid.lua", { config_dir = FIX,
                                                         builtin = OPTS.builtin }))
    end)

    it("does not count the validation's own work against the instruction limit", function()
      -- 2000 listeners take the validation far more than 100000 instructions;
      -- the stage's check_options, user code, still runs after them.
      local ls = {}
      for i = 1, 2000 do ls[i] = listener({ name = "l" .. i, listen = "127.0.0.1:" .. (10000 + i) }) end
      ls[#ls + 1] = listener({ name = "last", listen = "127.0.0.1:9999",
                               pipeline = { { "stages.checked", size = 2 } } })
      local cfg = ok_of(conf(ls), merge(deep_copy(OPTS), { instruction_limit = 100000 }))
      assert.are.equal(2001, #cfg.listeners)
      assert.are.same({ size = 2 }, cfg.listeners[2001].pipeline[1].options)
    end)

    it("does not let the file set globals", function()
      local cfg, err = config.load(FIX .. "/pollutes.lua")
      assert.is_nil(err)
      assert.is_table(cfg)
      assert.is_nil(rawget(_G, "sluice_test_leaked"))
      assert.is_nil(rawget(_G, "sluice_test_leaked_via_G"))
      assert.is_nil(rawget(_G, "sluice_test_leaked_via_rawset"))
    end)

    it("raises on bad arguments", function()
      assert.has_error(function() config.load(nil) end, "bad 'path' argument (string expected)")
      assert.has_error(function() config.validate({}, "x") end, "bad 'opts' argument (table expected)")
      assert.has_error(function() config.validate({}, { root = 1 }) end,
                       "bad 'opts.root' argument (string expected)")
      assert.has_error(function() config.validate({}, { builtin = "x" }) end,
                       "bad 'opts.builtin' argument (table expected)")
      assert.has_error(function() config.validate({}, { instruction_limit = 0 }) end,
                       "bad 'opts.instruction_limit' argument (positive integer expected)")
    end)

    it("refuses a folder that cannot be put on the search path", function()
      assert.are.equal('config error: config_dir "a;b": a folder whose name contains ";" or "?" '
                       .. "cannot be searched for modules", err_of(conf(), { config_dir = "a;b" }))
    end)
  end)

  describe("stage options", function()
    it("must be plain data, since every worker gets its own copy", function()
      local l = listener({ pipeline = { { "sluice.stages.echo", on_line = print } } })
      assert.are.equal('config error: listeners[1].pipeline[1].on_line: expected plain data '
                       .. '(a string, number, boolean or table), got a function',
                       err_of(conf({ l })))
      local nested = listener({ pipeline = { { "sluice.stages.echo", deny = { "A", { f = print } } } } })
      assert.are.equal('config error: listeners[1].pipeline[1].deny[2].f: expected plain data '
                       .. '(a string, number, boolean or table), got a function',
                       err_of(conf({ nested })))
      local ok = listener({ pipeline = { { "sluice.stages.echo", deny = { "FLUSHALL" }, n = 3 } } })
      assert.are.same({ deny = { "FLUSHALL" }, n = 3 }, ok_of(conf({ ok })).listeners[1].pipeline[1].options)
    end)
  end)

  describe("leak_detection", function()
    it("takes a level name or a table with a sample rate", function()
      assert.are.same({ level = "paranoid", sample_rate = 128 },
                      ok_of(conf(nil, { leak_detection = "paranoid" })).leak_detection)
      assert.are.same({ level = "advanced", sample_rate = 16 },
                      ok_of(conf(nil, { leak_detection = { level = "advanced", sample_rate = 16 } })).leak_detection)
    end)

    it("names the key and what was expected", function()
      assert.are.equal('config error: leak_detection: expected one of "disabled", "simple", "advanced", '
                       .. '"paranoid" or a table { level = ..., sample_rate = ... }, got "loud"',
                       err_of(conf(nil, { leak_detection = "loud" })))
      assert.are.equal('config error: leak_detection.level: expected one of "disabled", "simple", '
                       .. '"advanced", "paranoid", got 3',
                       err_of(conf(nil, { leak_detection = { level = 3 } })))
      assert.are.equal("config error: leak_detection.sample_rate: expected a positive integer, got 0",
                       err_of(conf(nil, { leak_detection = { sample_rate = 0 } })))
      assert.are.equal("config error: leak_detection.rate: unknown key (expected one of: level, sample_rate)",
                       err_of(conf(nil, { leak_detection = { rate = 1 } })))
    end)
  end)

  describe("allocator", function()
    it("takes every key, filling in the rest", function()
      local a = ok_of(conf(nil, { allocator = { type = "unpooled", arenas = 2,
                                                max_memory = 64 * 1048576 } })).allocator
      assert.are.equal("unpooled", a.type)
      assert.are.equal(2, a.arenas)
      assert.are.equal(64 * 1048576, a.max_memory)
      assert.are.equal(8192, a.page_size)
    end)

    it("names the key and what was expected", function()
      local cases = {
        { { tipe = "pooled" }, 'config error: allocator.tipe: unknown key (expected one of: '
          .. 'type, arenas, page_size, chunk_size, small_cache, normal_cache, max_cached, '
          .. 'trim_interval, trim_idle_ms, max_memory)' },
        { { type = "jemalloc" }, 'config error: allocator.type: expected "pooled" or "unpooled", got "jemalloc"' },
        { { page_size = 5000 }, "config error: allocator.page_size: expected a power of two from 4096 to 1048576, got 5000" },
        { { chunk_size = 65536 }, "config error: allocator.chunk_size: expected at least 16 pages (131072), got 65536" },
        { { small_cache = -1 }, "config error: allocator.small_cache: expected an integer from 0 to 65536, got -1" },
        { { trim_idle_ms = 0 }, "config error: allocator.trim_idle_ms: expected a positive integer, got 0" },
        { { arenas = 300 }, "config error: allocator.arenas: expected at most 256, got 300" },
        { { max_memory = 1000 }, "config error: allocator.max_memory: expected 0 (no limit) or at least chunk_size (4194304), got 1000" },
        { "big", 'config error: allocator: expected a table, got "big"' },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], err_of(conf(nil, { allocator = c[1] })))
      end
    end)
  end)

  describe("workers, draining and logs", function()
    it("take their values, and defaults when absent", function()
      local cfg = ok_of(conf(nil, { workers = 4, drain_timeout_ms = 0,
                                    error_log = "/var/log/sluice/error.log",
                                    access_log = "stderr" }))
      assert.are.equal(4, cfg.workers)
      assert.are.equal(0, cfg.drain_timeout_ms)
      assert.are.equal("/var/log/sluice/error.log", cfg.error_log)
      assert.are.equal("stderr", cfg.access_log)
      assert.are.equal("off", ok_of(conf(nil, { access_log = "off" })).access_log)
      assert.are.equal("access.log", ok_of(conf(nil, { access_log = "access.log" })).access_log)
      assert.are.equal("json", ok_of(conf(nil, { access_log_format = "json" })).access_log_format)
      assert.are.equal("logfmt", ok_of(conf(nil, { access_log_format = "logfmt" })).access_log_format)
      assert.is_nil(ok_of(conf(nil, {})).max_pipes)
      assert.are.equal(0, ok_of(conf(nil, { max_pipes = 0 })).max_pipes)
      assert.are.equal(4096, ok_of(conf(nil, { max_pipes = 4096 })).max_pipes)
      assert.are.equal(0, ok_of(conf(nil, {})).lua_memory_limit)
      assert.are.equal(0, ok_of(conf(nil, { lua_memory_limit = 0 })).lua_memory_limit)
      assert.are.equal(2 ^ 30, ok_of(conf(nil, { lua_memory_limit = 2 ^ 30 })).lua_memory_limit)
      assert.are.equal(5000, ok_of(conf(nil, {})).lua_timeout_ms)
      assert.are.equal(0, ok_of(conf(nil, { lua_timeout_ms = 0 })).lua_timeout_ms)
      assert.are.equal(200, ok_of(conf(nil, { lua_timeout_ms = 200 })).lua_timeout_ms)
      assert.are.equal(30000, ok_of(conf(nil, {})).resolve_cache_ms)
      assert.are.equal(0, ok_of(conf(nil, { resolve_cache_ms = 0 })).resolve_cache_ms)
    end)

    it("name the key and what was expected", function()
      local cases = {
        { { workers = 0 }, "config error: workers: expected a positive integer, got 0" },
        { { workers = 2.5 }, "config error: workers: expected a positive integer, got 2.5" },
        { { workers = "auto" }, 'config error: workers: expected a positive integer, got "auto"' },
        { { workers = 257 }, "config error: workers: expected at most 256, got 257" },
        { { access_log_format = "JSON" },
          'config error: access_log_format: expected one of "logfmt", "json", got "JSON"' },
        { { access_log_format = true },
          'config error: access_log_format: expected one of "logfmt", "json", got true' },
        { { drain_timeout_ms = -1 },
          "config error: drain_timeout_ms: expected an integer from 0 to 2147483647, got -1" },
        { { drain_timeout_ms = "10s" },
          'config error: drain_timeout_ms: expected an integer from 0 to 2147483647, got "10s"' },
        { { max_pipes = -1 },
          "config error: max_pipes: expected an integer from 0 to 2147483647, got -1" },
        { { max_pipes = 1.5 },
          "config error: max_pipes: expected an integer from 0 to 2147483647, got 1.5" },
        { { max_pipes = "auto" },
          'config error: max_pipes: expected an integer from 0 to 2147483647, got "auto"' },
        { { lua_memory_limit = 1048575 },
          "config error: lua_memory_limit: expected 0 (no limit) or at least 1048576 (1 MiB), got 1048575" },
        { { lua_memory_limit = "64M" },
          'config error: lua_memory_limit: expected an integer from 0 to 9007199254740992, got "64M"' },
        { { lua_memory_limit = -1 },
          "config error: lua_memory_limit: expected an integer from 0 to 9007199254740992, got -1" },
        { { lua_timeout_ms = -1 },
          "config error: lua_timeout_ms: expected an integer from 0 to 2147483647, got -1" },
        { { lua_timeout_ms = 0.5 },
          "config error: lua_timeout_ms: expected an integer from 0 to 2147483647, got 0.5" },
        { { lua_timeout_ms = "5s" },
          'config error: lua_timeout_ms: expected an integer from 0 to 2147483647, got "5s"' },
        { { lua_timeout_ms = 2 ^ 31 },
          "config error: lua_timeout_ms: expected an integer from 0 to 2147483647, got 2147483648" },
        { { resolve_cache_ms = -1 },
          "config error: resolve_cache_ms: expected an integer from 0 to 2147483647, got -1" },
        { { resolve_cache_ms = "30s" },
          'config error: resolve_cache_ms: expected an integer from 0 to 2147483647, got "30s"' },
        { { error_log = "off" },
          'config error: error_log: expected "stderr" or a file path, got "off"' },
        { { error_log = "" }, 'config error: error_log: expected "stderr" or a file path, got ""' },
        { { error_log = true },
          'config error: error_log: expected "stderr" or a file path, got true' },
        { { access_log = 1 },
          'config error: access_log: expected "stderr", "off" or a file path, got 1' },
        { { access_log = "a\nb" },
          'config error: access_log: expected "stderr", "off" or a file path, got "a\\nb"' },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], err_of(conf(nil, c[1])))
      end
    end)
  end)

  describe("admin", function()
    it("is off when absent, and takes a loopback address", function()
      assert.is_nil(ok_of(conf()).admin)
      assert.are.same({ listen = addr("127.0.0.1", 9901), public = false },
                      ok_of(conf(nil, { admin = { listen = "127.0.0.1:9901" } })).admin)
      assert.are.same({ listen = addr("127.0.0.1", 9901), public = false },
                      ok_of(conf(nil, { admin = { listen = "localhost:9901" } })).admin)
      assert.are.same({ listen = addr("127.3.2.1", 9901), public = false },
                      ok_of(conf(nil, { admin = { listen = "127.3.2.1:9901" } })).admin)
      assert.are.same({ listen = addr("::1", 9901, "inet6"), public = false },
                      ok_of(conf(nil, { admin = { listen = "[::1]:9901" } })).admin)
    end)

    it("takes any address with public = true", function()
      assert.are.same({ listen = addr("0.0.0.0", 9901), public = true },
                      ok_of(conf(nil, { admin = { listen = "*:9901", public = true } })).admin)
      assert.are.same({ listen = addr("10.1.2.3", 9901), public = true },
                      ok_of(conf(nil, { admin = { listen = "10.1.2.3:9901", public = true } })).admin)
    end)

    it("name the key and what was expected", function()
      local loopback = "expected a loopback address (127.0.0.1, [::1] or localhost) unless "
        .. "admin.public = true, got "
      local cases = {
        { { listen = "0.0.0.0:9901" }, "config error: admin.listen: " .. loopback .. '"0.0.0.0:9901"' },
        { { listen = "*:9901", public = false }, "config error: admin.listen: " .. loopback .. '"*:9901"' },
        { { listen = "10.1.2.3:9901" }, "config error: admin.listen: " .. loopback .. '"10.1.2.3:9901"' },
        { { listen = "[::]:9901" }, "config error: admin.listen: " .. loopback .. '"[::]:9901"' },
        { { listen = "127.0.0.1:0" },
          'config error: admin.listen: expected "host:port" with a port from 1 to 65535, got "127.0.0.1:0"' },
        { {}, "config error: admin.listen: expected \"host:port\" (the admin endpoint's address), got nil" },
        { { listen = "127.0.0.1:9901", public = "yes" },
          'config error: admin.public: expected a boolean, got "yes"' },
        { { listen = "127.0.0.1:9901", path = "/x" },
          'config error: admin.path: unknown key (expected one of: listen, public)' },
        { "127.0.0.1:9901",
          'config error: admin: expected a table { listen = "127.0.0.1:9901" }, got "127.0.0.1:9901"' },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], err_of(conf(nil, { admin = c[1] })))
      end
    end)

    it("may not share an address with a listener", function()
      assert.are.equal('config error: listeners[1].listen: expected a unique address, got '
                       .. '"127.0.0.1:7000" (127.0.0.1:7000 is also used by admin.listen)',
                       err_of(conf(nil, { admin = { listen = "127.0.0.1:7000" } })))
    end)
  end)

  describe("resolver", function()
    it("is absent unless given: the system's resolver", function()
      assert.is_nil(ok_of(conf()).resolver)
    end)

    it("normalizes its servers to c-ares' list, port 53 when none is given", function()
      assert.are.same({ servers = "10.0.0.2:53,10.0.0.3:5353,[fd00::2]:53,[::1]:5300",
                        list = { "10.0.0.2:53", "10.0.0.3:5353", "[fd00::2]:53", "[::1]:5300" },
                        timeout_ms = 1000, tries = 2, valid_ms = 0 },
                      ok_of(conf(nil, { resolver = {
                        servers = { "10.0.0.2", "10.0.0.3:5353", "[fd00::2]", "[::1]:5300" } } }))
                        .resolver)
      assert.are.same({ servers = "127.0.0.1:53", list = { "127.0.0.1:53" }, timeout_ms = 250,
                        tries = 1, valid_ms = 5000 },
                      ok_of(conf(nil, { resolver = { servers = { "127.0.0.1:53" }, timeout_ms = 250,
                                                     tries = 1, valid_ms = 5000 } })).resolver)
    end)

    it("passes itself to opts.resolve for upstream host names", function()
      local seen
      local opts = { builtin = OPTS.builtin, resolve = function(name, r)
        seen = { name, r and r.servers }
        return { { host = "10.0.0.5", family = "inet" } }
      end }
      ok_of(conf(nil, { resolver = { servers = { "10.0.0.2" } },
                        upstreams = { demo = { servers = { "db.internal:5432" } } } }), opts)
      assert.are.same({ "db.internal", "10.0.0.2:53" }, seen)
      ok_of(conf(nil, { upstreams = { demo = { servers = { "db.internal:5432" } } } }), opts)
      assert.are.same({ "db.internal" }, seen)
    end)

    it("names the key and what was expected", function()
      local cases = {
        { "10.0.0.2", 'config error: resolver: expected a table { servers = { "127.0.0.1:53" } }, '
                      .. 'got "10.0.0.2"' },
        { {}, 'config error: resolver.servers: expected an array of DNS server addresses '
              .. '{ "10.0.0.2", "10.0.0.3:53" }, got nil' },
        { { servers = {} }, "config error: resolver.servers: expected 1 to 8 addresses, got 0" },
        { { servers = { "dns.internal:53" } }, "config error: resolver.servers[1]: expected an IP "
          .. 'address (a DNS server is not found by name), got "dns.internal:53"' },
        { { servers = { "10.0.0.2", "10.0.0.2:53" } }, "config error: resolver.servers[2]: "
          .. 'expected a unique address, got "10.0.0.2:53" (also resolver.servers[1])' },
        { { servers = { "10.0.0.2:0" } }, 'config error: resolver.servers[1]: expected "host:port" '
          .. 'with a port from 1 to 65535, got "10.0.0.2:0"' },
        { { servers = { 53 } }, 'config error: resolver.servers[1]: expected an address "ip" or '
          .. '"ip:port" ([ip6] in brackets), got 53' },
        { { servers = { "10.0.0.2" }, timeout_ms = 50 },
          "config error: resolver.timeout_ms: expected an integer from 100 to 60000, got 50" },
        { { servers = { "10.0.0.2" }, tries = 0 },
          "config error: resolver.tries: expected an integer from 1 to 10, got 0" },
        { { servers = { "10.0.0.2" }, valid_ms = 10 },
          "config error: resolver.valid_ms: expected an integer from 1000 to 2147483647, got 10" },
        { { servers = { "10.0.0.2" }, ttl = 5 }, "config error: resolver.ttl: unknown key "
          .. "(expected one of: servers, timeout_ms, tries, valid_ms)" },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], err_of(conf(nil, { resolver = c[1] })))
      end
    end)
  end)

  describe("listener limits", function()
    it("take max_connections, idle_timeout_ms, write_timeout_ms and connect_timeout_ms", function()
      local l = ok_of(conf({ listener({ max_connections = 100, idle_timeout_ms = 30000,
                                        write_timeout_ms = 5000, connect_timeout_ms = 250,
                                        max_connections_per_client = 8 }) })).listeners[1]
      assert.are.equal(100, l.max_connections)
      assert.are.equal(8, l.max_connections_per_client)
      assert.are.equal(30000, l.idle_timeout_ms)
      assert.are.equal(5000, l.write_timeout_ms)
      assert.are.equal(250, l.connect_timeout_ms)
    end)

    it("name the key and what was expected", function()
      local cases = {
        { { max_connections = 0 },
          "config error: listeners[1].max_connections: expected a positive integer, got 0" },
        { { max_connections = "many" },
          'config error: listeners[1].max_connections: expected a positive integer, got "many"' },
        { { max_connections_per_client = 0 },
          "config error: listeners[1].max_connections_per_client: expected a positive integer, got 0" },
        { { max_connections_per_client = 1.5 },
          "config error: listeners[1].max_connections_per_client: expected a positive integer, got 1.5" },
        { { max_connection_rate = 0 },
          "config error: listeners[1].max_connection_rate: expected a positive integer, got 0" },
        { { max_connection_rate = 2.5 },
          "config error: listeners[1].max_connection_rate: expected a positive integer, got 2.5" },
        { { max_connection_rate = 1000001 },
          "config error: listeners[1].max_connection_rate: expected an integer from 1 to 1000000, got 1000001" },
        { { idle_timeout_ms = -5 },
          "config error: listeners[1].idle_timeout_ms: expected a positive integer, got -5" },
        { { connect_timeout_ms = 0 },
          "config error: listeners[1].connect_timeout_ms: expected a positive integer, got 0" },
        { { write_timeout_ms = 0 },
          "config error: listeners[1].write_timeout_ms: expected a positive integer, got 0" },
        { { write_timeout_ms = -1000 },
          "config error: listeners[1].write_timeout_ms: expected a positive integer, got -1000" },
        { { write_timeout_ms = 2.5 },
          "config error: listeners[1].write_timeout_ms: expected a positive integer, got 2.5" },
        { { write_timeout_ms = "5s" },
          'config error: listeners[1].write_timeout_ms: expected a positive integer, got "5s"' },
        { { write_timeout_ms = true },
          "config error: listeners[1].write_timeout_ms: expected a positive integer, got true" },
        { { idle_timeout_ms = 1e10 },
          "config error: listeners[1].idle_timeout_ms: expected a positive integer no larger than "
          .. "2147483647, got 10000000000" },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], err_of(conf({ listener(c[1]) })))
      end
    end)
  end)

  describe("errors", function()
    describe("raised by the configuration's own code", function()
      local SUFFIX = " (raised by the __index metamethod of a configuration table during validation)"

      local function raising(v)
        return setmetatable({}, { __index = function() error(v, 0) end })
      end

      it("come out as one line, at the file or the top level", function()
        assert.are.same({ nil, "config error: " .. FIX .. "/raises_in_index.lua:2: no such key here"
                               .. SUFFIX },
                        { config.load(FIX .. "/raises_in_index.lua") })
        assert.are.equal("config error: top level: x" .. SUFFIX, err_of(raising("x")))
        assert.are.equal("config error: top level: raised a table" .. SUFFIX, err_of(raising({ 1 })))
        assert.are.equal("config error: top level: two lines" .. SUFFIX, err_of(raising("two\nlines")))
        -- In a table deeper in the configuration, and from a function the
        -- metamethod calls.
        local deep = setmetatable({}, { __index = function()
          local function inner() local n = nil; return n + 1 end
          return inner()
        end })
        local err = err_of(conf({ deep }))
        assert.matches("^config error: top level: spec/unit/config_spec%.lua:%d+: attempt to perform "
                       .. "arithmetic on local 'n' %(a nil value%)", err)
        assert.are.equal(SUFFIX, err:sub(-#SUFFIX))
      end)

      it("come out so from a resolver given in opts", function()
        local opts = { builtin = OPTS.builtin, resolve = function() error("resolver down", 0) end }
        assert.are.equal("config error: top level: resolver down (raised by code outside sluice.config "
                         .. "during validation)",
                         err_of(conf(nil, { upstreams = { demo = { servers = { "db.internal:1" } } } }),
                                opts))
      end)

      it("but an error of sluice.config itself is raised", function()
        -- A resolver answering numbers where address tables belong: the
        -- validation's own code fails on them.
        local opts = { builtin = OPTS.builtin, resolve = function() return { 5 } end }
        assert.has_error(function()
          config.validate(conf(nil, { upstreams = { demo = { servers = { "db.internal:1" } } } }), opts)
        end)
      end)
    end)

    describe("top level", function()
      it("needs a table", function()
        assert.are.equal("config error: top level: expected a table, got nil", err_of(nil))
      end)

      it("rejects unknown keys", function()
        assert.are.equal("config error: listener: unknown key (expected one of: listeners, upstreams, log_level, allocator, leak_detection, workers, drain_timeout_ms, error_log, access_log, access_log_format, admin, max_pipes, lua_memory_limit, lua_timeout_ms, resolve_cache_ms, resolver)",
                         err_of(conf(nil, { listener = {}, zzz = 1 })))
        assert.are.equal('config error: [1]: unknown key (expected one of: listeners, upstreams, log_level, allocator, leak_detection, workers, drain_timeout_ms, error_log, access_log, access_log_format, admin, max_pipes, lua_memory_limit, lua_timeout_ms, resolve_cache_ms, resolver)',
                         err_of(conf(nil, { [1] = "x" })))
        assert.are.equal('config error: ["log level"]: unknown key (expected one of: listeners, upstreams, log_level, allocator, leak_detection, workers, drain_timeout_ms, error_log, access_log, access_log_format, admin, max_pipes, lua_memory_limit, lua_timeout_ms, resolve_cache_ms, resolver)',
                         err_of(conf(nil, { ["log level"] = "x" })))
      end)

      it("checks log_level", function()
        assert.are.equal('config error: log_level: expected one of "debug", "info", "warn", "error", got "verbose"',
                         err_of(conf(nil, { log_level = "verbose" })))
        assert.are.equal('config error: log_level: expected one of "debug", "info", "warn", "error", got 3',
                         err_of(conf(nil, { log_level = 3 })))
      end)

      it("checks in a fixed order: keys, log_level, upstreams, listeners", function()
        local bad = { listeners = 1, upstreams = 1, log_level = 1 }
        assert.are.equal("config error: bogus: unknown key (expected one of: listeners, upstreams, log_level, allocator, leak_detection, workers, drain_timeout_ms, error_log, access_log, access_log_format, admin, max_pipes, lua_memory_limit, lua_timeout_ms, resolve_cache_ms, resolver)",
                         err_of(merge(deep_copy(bad), { bogus = 1 })))
        assert.matches("^config error: log_level:", err_of(deep_copy(bad)))
        assert.matches("^config error: upstreams:", err_of(merge(deep_copy(bad), { log_level = NONE })))
      end)
    end)

    describe("listeners", function()
      it("are required and non-empty", function()
        assert.are.equal("config error: listeners: expected a non-empty array of listener tables, got nil",
                         err_of(conf(nil, { listeners = NONE })))
        assert.are.equal("config error: listeners: expected a non-empty array of listener tables, got an empty table",
                         err_of(conf({})))
        assert.are.equal('config error: listeners: expected a non-empty array of listener tables, got "front"',
                         err_of(conf(nil, { listeners = "front" })))
      end)

      it("must be an array", function()
        assert.are.equal("config error: listeners[3]: unknown key (expected an array: keys 1, 2, ... without gaps)",
                         err_of(conf({ [1] = listener(), [3] = listener() })))
        assert.are.equal("config error: listeners.front: unknown key (expected an array: keys 1, 2, ... without gaps)",
                         err_of(conf({ front = listener() })))
      end)

      it("must be tables", function()
        assert.are.equal('config error: listeners[1]: expected a listener table, got "front"',
                         err_of(conf({ "front" })))
      end)

      it("reject unknown keys", function()
        assert.are.equal("config error: listeners[1].lisen: unknown key (expected one of: name, listen, "
                         .. "upstream, pipeline, low_water_mark, high_water_mark, outbound_limit, "
                         .. "write_spin_count, max_bytes_per_gathering_write, max_connections, "
                         .. "max_connections_per_client, max_connection_rate, idle_timeout_ms, write_timeout_ms, "
                         .. "connect_timeout_ms, "
                         .. "defer_accept, splice, half_close, half_close_timeout_ms, tcp_keepalive, backlog, "
                         .. "tls)",
                         err_of(conf({ listener({ lisen = "127.0.0.1:7000" }) })))
      end)

      it("need a name", function()
        assert.are.equal("config error: listeners[1].name: expected a non-empty string, got nil",
                         err_of(conf({ listener({ name = NONE }) })))
        assert.are.equal("config error: listeners[2].name: expected a non-empty string, got 2",
                         err_of(conf({ listener(), listener({ name = 2, listen = "127.0.0.1:1" }) })))
        assert.are.equal('config error: listeners[1].name: expected a non-empty string, got ""',
                         err_of(conf({ listener({ name = "" }) })))
      end)

      it("need a name that log lines, the access log and labels can carry as is", function()
        for _, bad in ipairs({ "my front", 'a"b', "a\nb", "a=b", "caf\195\169" }) do
          assert.are.equal(('config error: listeners[1].name: expected a name made of letters, '
                            .. 'digits, "_", "-" and ".", got %s'):format(
                              (("%q"):format(bad):gsub("\\\n", "\\n"))),
                           err_of(conf({ listener({ name = bad }) })))
        end
        assert.are.equal("front-2.b_c", ok_of(conf({ listener({ name = "front-2.b_c" }) }))
                                           .listeners[1].name)
      end)

      it("need unique names", function()
        assert.are.equal('config error: listeners[2].name: expected a unique name, got "front" (also listeners[1])',
                         err_of(conf({ listener(), listener({ listen = "127.0.0.1:7001" }) })))
      end)

      it("need a host:port listen string", function()
        assert.are.equal('config error: listeners[1].listen: expected "host:port", got 7000',
                         err_of(conf({ listener({ listen = 7000 }) })))
        assert.are.equal('config error: listeners[1].listen: expected "host:port", got "127.0.0.1"',
                         err_of(conf({ listener({ listen = "127.0.0.1" }) })))
        assert.are.equal('config error: listeners[1].listen: expected "host:port", got nil',
                         err_of(conf({ listener({ listen = NONE }) })))
        assert.are.equal('config error: listeners[1].listen: expected "host:port", got "[::1]"',
                         err_of(conf({ listener({ listen = "[::1]" }) })))
      end)

      it("need a port from 1 to 65535", function()
        for _, listen in ipairs({ "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:", "127.0.0.1:http",
                                   "127.0.0.1:-1", "127.0.0.1:80.5" }) do
          assert.are.equal('config error: listeners[1].listen: expected "host:port" with a port from 1 to 65535, got "'
                           .. listen .. '"', err_of(conf({ listener({ listen = listen }) })))
        end
      end)

      it("need a numeric host", function()
        for _, listen in ipairs({ "example.com:80", "256.0.0.1:80", "01.2.3.4:80", "1.2.3:80", ":80",
                                   "1.2.3.4.5:80" }) do
          assert.are.equal('config error: listeners[1].listen: expected "host:port" with host an IPv4 address, '
                           .. '[IPv6 address], localhost or *, got "' .. listen .. '"',
                           err_of(conf({ listener({ listen = listen }) })))
        end
      end)

      it("need IPv6 hosts in brackets", function()
        assert.are.equal('config error: listeners[1].listen: expected "host:port" with an IPv6 host in brackets, '
                         .. 'as "[::1]:80", got "::1:7000"',
                         err_of(conf({ listener({ listen = "::1:7000" }) })))
      end)

      it("need a valid IPv6 address in the brackets", function()
        for _, host in ipairs({ ":::1", "1::2::3", "1:2:3:4:5:6:7:8:9", "12345::", "1:2:3:4:5:6:7",
                                 "1.2.3.4", "::1.2.3", "g::1", "::1%eth0", "" }) do
          assert.are.equal('config error: listeners[1].listen: expected "host:port" with a valid IPv6 address '
                           .. 'in the brackets, got "[' .. host .. ']:7000"',
                           err_of(conf({ listener({ listen = "[" .. host .. "]:7000" }) })))
        end
      end)

      it("refuse an IPv4-mapped IPv6 address, as admin.listen and as a server too", function()
        local function mapped(path, given, v4)
          return ('config error: %s: expected "host:port" with an IPv4 address written as itself, '
                  .. 'not IPv4-mapped (write "%s"), got "%s"'):format(path, v4, given)
        end
        for given, v4 in pairs({ ["[::ffff:127.0.0.1]:27101"] = "127.0.0.1:27101",
                                 ["[::FFFF:7f00:1]:80"] = "127.0.0.1:80",
                                 ["[0:0:0:0:0:ffff:10.1.2.3]:80"] = "10.1.2.3:80",
                                 ["[::ffff:0.0.0.0]:80"] = "0.0.0.0:80" }) do
          assert.are.equal(mapped("listeners[1].listen", given, v4),
                           err_of(conf({ listener({ listen = given }) })))
          assert.are.equal(mapped("admin.listen", given, v4),
                           err_of(conf(nil, { admin = { listen = given } })))
          assert.are.equal(mapped("upstreams.demo.servers[1]", given, v4),
                           err_of(conf(nil, { upstreams = { demo = { servers = { given } } } })))
        end
      end)

      it("need unique listen addresses", function()
        assert.are.equal('config error: listeners[2].listen: expected a unique address, got "localhost:7000" '
                         .. "(127.0.0.1:7000 is also used by listeners[1])",
                         err_of(conf({ listener(), listener({ name = "b", listen = "localhost:7000" }) })))
        assert.are.equal('config error: listeners[2].listen: expected a unique address, got "[0::1]:7000" '
                         .. "([::1]:7000 is also used by listeners[1])",
                         err_of(conf({ listener({ listen = "[::1]:7000" }),
                                       listener({ name = "b", listen = "[0::1]:7000" }) })))
      end)

      it("may not overlap the wildcard address of their family on the same port", function()
        assert.are.equal('config error: listeners[2].listen: expected an address that does not overlap '
                         .. 'another, got "127.0.0.1:7000" (127.0.0.1:7000 overlaps 0.0.0.0:7000 used by '
                         .. "listeners[1])",
                         err_of(conf({ listener({ listen = "*:7000" }),
                                       listener({ name = "b", listen = "127.0.0.1:7000" }) })))
        assert.are.equal('config error: listeners[2].listen: expected an address that does not overlap '
                         .. 'another, got "[::]:7000" ([::]:7000 overlaps [::1]:7000 used by listeners[1])',
                         err_of(conf({ listener({ listen = "[::1]:7000" }),
                                       listener({ name = "b", listen = "[::]:7000" }) })))
        assert.are.equal('config error: listeners[1].listen: expected an address that does not overlap '
                         .. 'another, got "*:7000" (0.0.0.0:7000 overlaps 127.0.0.1:7000 used by admin.listen)',
                         err_of(conf({ listener({ listen = "*:7000" }) },
                                     { admin = { listen = "127.0.0.1:7000" } })))
        -- IPv6 listeners are IPv6-only; other ports never overlap.
        ok_of(conf({ listener({ listen = "*:7000" }), listener({ name = "b", listen = "[::]:7000" }),
                     listener({ name = "c", listen = "127.0.0.1:7001" }) }))
      end)

      it("name a defined upstream", function()
        assert.are.equal('config error: listeners[1].upstream: expected the name of an upstream (one of: demo), got "nope"',
                         err_of(conf({ listener({ upstream = "nope" }) })))
        assert.are.equal('config error: listeners[1].upstream: expected the name of an upstream (one of: a, demo), got 1',
                         err_of(conf({ listener({ upstream = 1 }) },
                                     { upstreams = { demo = { servers = { "127.0.0.1:1" } },
                                                     a = { servers = { "127.0.0.1:2" } } } })))
        assert.are.equal('config error: listeners[1].upstream: expected the name of an upstream '
                         .. '(no upstreams are defined), got "demo"',
                         err_of(conf(nil, { upstreams = NONE })))
      end)

      it("need an upstream or a pipeline", function()
        assert.are.equal("config error: listeners[1]: expected an upstream or a pipeline",
                         err_of(conf({ listener({ upstream = NONE }) })))
        assert.are.equal("config error: listeners[1]: expected an upstream or a pipeline",
                         err_of(conf({ listener({ upstream = NONE, pipeline = {} }) })))
      end)

      it("need positive integer water marks", function()
        assert.are.equal("config error: listeners[1].low_water_mark: expected a positive integer, got 1.5",
                         err_of(conf({ listener({ low_water_mark = 1.5 }) })))
        assert.are.equal("config error: listeners[1].high_water_mark: expected a positive integer, got 0",
                         err_of(conf({ listener({ high_water_mark = 0 }) })))
        assert.are.equal('config error: listeners[1].high_water_mark: expected a positive integer, got "64k"',
                         err_of(conf({ listener({ high_water_mark = "64k" }) })))
        assert.are.equal("config error: listeners[1].high_water_mark: expected a positive integer no larger "
                         .. "than 2147483647, got 4294967296",
                         err_of(conf({ listener({ high_water_mark = 2 ^ 32 }) })))
        assert.are.equal("config error: listeners[1].low_water_mark: expected a positive integer, got nan",
                         err_of(conf({ listener({ low_water_mark = 0 / 0 }) })):gsub("%-nan$", "nan"))
      end)

      it("take backlog from 1 to 65535, 511 by default", function()
        assert.are.equal(511, ok_of(conf({ listener() })).listeners[1].backlog)
        assert.are.equal(4096, ok_of(conf({ listener({ backlog = 4096 }) })).listeners[1].backlog)
        assert.are.equal("config error: listeners[1].backlog: expected an integer from 1 to 65535, got 65536",
                         err_of(conf({ listener({ backlog = 65536 }) })))
        assert.are.equal("config error: listeners[1].backlog: expected a positive integer, got 0",
                         err_of(conf({ listener({ backlog = 0 }) })))
        assert.are.equal('config error: listeners[1].backlog: expected a positive integer, got "128"',
                         err_of(conf({ listener({ backlog = "128" }) })))
      end)

      it("take defer_accept as a boolean", function()
        assert.is_true(ok_of(conf({ listener({ defer_accept = true }) })).listeners[1].defer_accept)
        assert.is_false(ok_of(conf({ listener({ defer_accept = false, splice = true }) })).listeners[1].defer_accept)
        assert.are.equal("config error: listeners[1].defer_accept: expected a boolean, got 1",
                         err_of(conf({ listener({ defer_accept = 1 }) })))
        assert.are.equal('config error: listeners[1].defer_accept: expected a boolean, got "yes"',
                         err_of(conf({ listener({ defer_accept = "yes" }) })))
      end)

      it('take splice as a boolean or "auto", "auto" by default', function()
        assert.are.equal("auto", ok_of(conf({ listener({}) })).listeners[1].splice)
        assert.are.equal("auto", ok_of(conf({ listener({ splice = "auto" }) })).listeners[1].splice)
        assert.is_true(ok_of(conf({ listener({ splice = true }) })).listeners[1].splice)
        assert.is_false(ok_of(conf({ listener({ splice = false }) })).listeners[1].splice)
        assert.are.equal('config error: listeners[1].splice: expected a boolean or "auto", got "on"',
                         err_of(conf({ listener({ splice = "on" }) })))
        assert.are.equal('config error: listeners[1].splice: expected a boolean or "auto", got 1',
                         err_of(conf({ listener({ splice = 1 }) })))
      end)

      it("take half_close as a boolean, true by default", function()
        assert.is_true(ok_of(conf({ listener({}) })).listeners[1].half_close)
        assert.is_false(ok_of(conf({ listener({ half_close = false }) })).listeners[1].half_close)
        assert.are.equal('config error: listeners[1].half_close: expected a boolean, got "off"',
                         err_of(conf({ listener({ half_close = "off" }) })))
      end)

      it("take half_close_timeout_ms as a positive integer", function()
        assert.are.equal(5000, ok_of(conf({ listener({ half_close_timeout_ms = 5000 }) }))
          .listeners[1].half_close_timeout_ms)
        assert.are.equal("config error: listeners[1].half_close_timeout_ms: expected a positive integer, got 0",
                         err_of(conf({ listener({ half_close_timeout_ms = 0 }) })))
        assert.are.equal('config error: listeners[1].half_close_timeout_ms: expected a positive integer, got "5s"',
                         err_of(conf({ listener({ half_close_timeout_ms = "5s" }) })))
      end)

      it("take tls as a table: files made absolute from the config's folder, defaults filled", function()
        local function t(v) return ok_of(conf({ listener({ tls = v }) })).listeners[1].tls end
        assert.is_nil(t(nil))
        assert.are.same({ certificate = FIX .. "/site.crt", key = "/etc/site.key",
                          min_version = "TLSv1.2", handshake_timeout_ms = 10000,
                          proxy_protocol = false },
                        t({ certificate = "site.crt", key = "/etc/site.key" }))
        assert.are.same({ certificate = "/a.crt", key = "/a.key", ciphers = "HIGH",
                          ciphersuites = "TLS_AES_128_GCM_SHA256", min_version = "TLSv1.3",
                          alpn = { "h2", "http/1.1" }, handshake_timeout_ms = 500,
                          proxy_protocol = true },
                        t({ certificate = "/a.crt", key = "/a.key", ciphers = "HIGH",
                            ciphersuites = "TLS_AES_128_GCM_SHA256", min_version = "TLSv1.3",
                            alpn = { "h2", "http/1.1" }, handshake_timeout_ms = 500,
                            proxy_protocol = true }))
        local function bad(v) return err_of(conf({ listener({ tls = v }) })) end
        assert.are.equal('config error: listeners[1].tls: expected a table { certificate, key, ... }, '
                         .. 'got true', bad(true))
        assert.are.equal('config error: listeners[1].tls.proxy_protocol: expected a boolean, '
                         .. 'got "v2"', bad({ certificate = "/a.crt", key = "/a.key",
                                              proxy_protocol = "v2" }))
        assert.are.equal("config error: listeners[1].tls.certificate: expected a non-empty string, "
                         .. "got nil", bad({ key = "/a.key" }))
        assert.are.equal('config error: listeners[1].tls.key: expected a non-empty string, got ""',
                         bad({ certificate = "/a.crt", key = "" }))
        assert.are.equal("config error: listeners[1].tls.crt: unknown key (expected one of: "
                         .. "certificate, key, ocsp_response, certificates, client_ca, "
                         .. "client_certificate, crl, ticket_keys, ciphers, ciphersuites, "
                         .. "min_version, alpn, handshake_timeout_ms, proxy_protocol)",
                         bad({ crt = "/a.crt" }))
        assert.are.equal('config error: listeners[1].tls.crl: expected it only with client_ca '
                         .. '(it revokes client certificates), got "c.crl"',
                         bad({ certificate = "/a.crt", key = "/a.key", crl = "c.crl" }))
        assert.are.equal("config error: listeners[1].tls.ticket_keys: expected a non-empty array "
                         .. "of key files (the first encrypts), got an empty table",
                         bad({ certificate = "/a.crt", key = "/a.key", ticket_keys = {} }))
        assert.are.equal("config error: listeners[1].tls.ticket_keys[2]: expected a non-empty "
                         .. "string, got 7",
                         bad({ certificate = "/a.crt", key = "/a.key", ticket_keys = { "k", 7 } }))
        assert.are.same({ crl = FIX .. "/c.crl", ocsp_response = FIX .. "/a.ocsp",
                          ticket_keys = { FIX .. "/t1.key", "/t2.key" },
                          certificates = { { certificate = "/b.crt", key = "/b.key",
                                             ocsp_response = FIX .. "/b.ocsp" } } },
                        (function(v)
          return { crl = v.crl, ocsp_response = v.ocsp_response, ticket_keys = v.ticket_keys,
                   certificates = v.certificates }
        end)(t({ certificate = "/a", key = "/b", client_ca = "/ca.pem", crl = "c.crl",
                 ocsp_response = "a.ocsp", ticket_keys = { "t1.key", "/t2.key" },
                 certificates = { { certificate = "/b.crt", key = "/b.key",
                                    ocsp_response = "b.ocsp" } } })))
        assert.are.same({ "/ca.pem", "optional" }, (function(v)
          return { v.client_ca, v.client_certificate }
        end)(t({ certificate = "/a", key = "/b", client_ca = "/ca.pem",
                 client_certificate = "optional" })))
        assert.are.equal("required", t({ certificate = "/a", key = "/b", client_ca = "ca.pem" })
          .client_certificate)
        assert.are.equal(FIX .. "/ca.pem", t({ certificate = "/a", key = "/b", client_ca = "ca.pem" })
          .client_ca)
        assert.are.equal('config error: listeners[1].tls.client_certificate: expected it only '
                         .. 'with client_ca (the CAs that issue client certificates), got "optional"',
                         bad({ certificate = "/a", key = "/b", client_certificate = "optional" }))
        assert.are.equal('config error: listeners[1].tls.client_certificate: expected one of '
                         .. '"required", "optional", got "yes"',
                         bad({ certificate = "/a", key = "/b", client_ca = "/c",
                               client_certificate = "yes" }))
        assert.are.same({ { certificate = FIX .. "/b.crt", key = "/b.key" } },
                        t({ certificate = "/a.crt", key = "/a.key",
                            certificates = { { certificate = "b.crt", key = "/b.key" } } })
                          .certificates)
        assert.are.equal("config error: listeners[1].tls.certificates: expected a non-empty array "
                         .. "of { certificate = file, key = file }, got an empty table",
                         bad({ certificate = "/a", key = "/b", certificates = {} }))
        assert.are.equal('config error: listeners[1].tls.certificates[1]: expected a table '
                         .. '{ certificate = file, key = file }, got "/c.crt"',
                         bad({ certificate = "/a", key = "/b", certificates = { "/c.crt" } }))
        assert.are.equal("config error: listeners[1].tls.certificates[1].key: expected a "
                         .. "non-empty string, got nil",
                         bad({ certificate = "/a", key = "/b", certificates = { { certificate = "/c" } } }))
        assert.are.equal("config error: listeners[1].tls.certificates[1].crt: unknown key "
                         .. "(expected one of: certificate, key, ocsp_response)",
                         bad({ certificate = "/a", key = "/b", certificates = { { crt = "/c" } } }))
        assert.are.equal('config error: listeners[1].tls.min_version: expected one of "TLSv1.2", '
                         .. '"TLSv1.3", got "SSLv3"',
                         bad({ certificate = "/a", key = "/b", min_version = "SSLv3" }))
        assert.are.equal("config error: listeners[1].tls.alpn: expected a non-empty array of "
                         .. "protocol names, got an empty table",
                         bad({ certificate = "/a", key = "/b", alpn = {} }))
        assert.are.equal("config error: listeners[1].tls.alpn[2]: expected a string of 1 to 255 "
                         .. "bytes, got 42", bad({ certificate = "/a", key = "/b", alpn = { "h2", 42 } }))
        assert.are.equal("config error: listeners[1].tls.handshake_timeout_ms: expected a positive "
                         .. "integer, got 0",
                         bad({ certificate = "/a", key = "/b", handshake_timeout_ms = 0 }))
      end)

      it("take tcp_keepalive as a boolean or a table of idle_ms, interval_ms and count", function()
        local function ka(v) return ok_of(conf({ listener({ tcp_keepalive = v }) })).listeners[1].tcp_keepalive end
        assert.is_false(ka(false))
        assert.are.same({ idle_ms = 0, interval_ms = 0, count = 0 }, ka(true))
        assert.are.same({ idle_ms = 0, interval_ms = 0, count = 0 }, ka({}))
        assert.are.same({ idle_ms = 60000, interval_ms = 10000, count = 5 },
                        ka({ idle_ms = 60000, interval_ms = 10000, count = 5 }))
        local function bad(v) return err_of(conf({ listener({ tcp_keepalive = v }) })) end
        assert.are.equal('config error: listeners[1].tcp_keepalive: expected a boolean or a table '
                         .. '{ idle_ms, interval_ms, count }, got "on"', bad("on"))
        assert.are.equal("config error: listeners[1].tcp_keepalive.idle: unknown key (expected one of: "
                         .. "idle_ms, interval_ms, count)", bad({ idle = 60 }))
        assert.are.equal("config error: listeners[1].tcp_keepalive.interval_ms: expected a positive "
                         .. "integer, got 0", bad({ interval_ms = 0 }))
        assert.are.equal("config error: listeners[1].tcp_keepalive.idle_ms: expected at most 32767000, "
                         .. "got 40000000", bad({ idle_ms = 40000000 }))
        assert.are.equal("config error: listeners[1].tcp_keepalive.count: expected at most 127, got 200",
                         bad({ count = 200 }))
      end)

      it("take outbound_limit, write_spin_count and max_bytes_per_gathering_write", function()
        local l = ok_of(conf({ listener({ outbound_limit = 1048576, write_spin_count = 4,
                                          max_bytes_per_gathering_write = 8192 }) })).listeners[1]
        assert.are.equal(1048576, l.outbound_limit)
        assert.are.equal(4, l.write_spin_count)
        assert.are.equal(8192, l.max_bytes_per_gathering_write)
        -- The limit may equal the high water mark.
        l = ok_of(conf({ listener({ high_water_mark = 4096, outbound_limit = 4096 }) })).listeners[1]
        assert.are.equal(4096, l.outbound_limit)
        assert.is_nil(l.max_bytes_per_gathering_write)
      end)

      it("need positive integers for the write limits", function()
        assert.are.equal("config error: listeners[1].outbound_limit: expected a positive integer, got 0",
                         err_of(conf({ listener({ outbound_limit = 0 }) })))
        assert.are.equal('config error: listeners[1].outbound_limit: expected a positive integer, got "16m"',
                         err_of(conf({ listener({ outbound_limit = "16m" }) })))
        assert.are.equal("config error: listeners[1].outbound_limit: expected a positive integer no larger "
                         .. "than 2147483647, got 4294967296",
                         err_of(conf({ listener({ outbound_limit = 2 ^ 32 }) })))
        assert.are.equal("config error: listeners[1].write_spin_count: expected a positive integer, got 0",
                         err_of(conf({ listener({ write_spin_count = 0 }) })))
        assert.are.equal("config error: listeners[1].write_spin_count: expected a positive integer, got 2.5",
                         err_of(conf({ listener({ write_spin_count = 2.5 }) })))
        assert.are.equal("config error: listeners[1].max_bytes_per_gathering_write: expected a positive "
                         .. "integer, got -1",
                         err_of(conf({ listener({ max_bytes_per_gathering_write = -1 }) })))
        assert.are.equal("config error: listeners[1].max_bytes_per_gathering_write: expected a positive "
                         .. "integer, got true",
                         err_of(conf({ listener({ max_bytes_per_gathering_write = true }) })))
      end)

      it("need outbound_limit >= high_water_mark", function()
        assert.are.equal("config error: listeners[1].outbound_limit: expected at least high_water_mark (1048576), got 1048575",
                         err_of(conf({ listener({ outbound_limit = 1048575 }) })))
        assert.are.equal("config error: listeners[1].outbound_limit: expected at least high_water_mark (100000), got 99999",
                         err_of(conf({ listener({ high_water_mark = 100000, low_water_mark = 10,
                                                  outbound_limit = 99999 }) })))
      end)

      it("need low_water_mark <= high_water_mark", function()
        assert.are.equal("config error: listeners[1].low_water_mark: expected at most high_water_mark (1048576), got 2000000",
                         err_of(conf({ listener({ low_water_mark = 2000000 }) })))
        assert.are.equal("config error: listeners[1].low_water_mark: expected at most high_water_mark (10), got 11",
                         err_of(conf({ listener({ low_water_mark = 11, high_water_mark = 10 }) })))
      end)
    end)

    describe("pipelines", function()
      local function perr(pipeline, opts)
        return err_of(conf({ listener({ pipeline = pipeline }) }), opts)
      end

      it("must be arrays", function()
        assert.are.equal('config error: listeners[1].pipeline: expected an array of stages, got "stages.pass"',
                         perr("stages.pass"))
        assert.are.equal("config error: listeners[1].pipeline.first: unknown key (expected an array: keys 1, 2, "
                         .. "... without gaps)", perr({ first = "stages.pass" }))
      end)

      it("hold module names or stage tables", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: expected a module name or a table '
                         .. '{ "module.name", option = value, ... }, got true', perr({ true }))
      end)

      it("need well-formed module names", function()
        for _, name in ipairs({ "", "stages/pass", ".stages", "stages.", "stages..pass", "stages pass" }) do
          assert.are.equal('config error: listeners[1].pipeline[1]: expected a module name like '
                           .. '"examples.stages.log_chunks", got "' .. name .. '"', perr({ name }))
        end
        assert.are.equal('config error: listeners[1].pipeline[1][1]: expected a module name like '
                         .. '"examples.stages.log_chunks", got nil', perr({ { prefix = ">" } }))
        assert.are.equal('config error: listeners[1].pipeline[2][1]: expected a module name like '
                         .. '"examples.stages.log_chunks", got "a-b"', perr({ "stages.pass", { "a-b" } }))
      end)

      it("take options under string keys only", function()
        assert.are.equal("config error: listeners[1].pipeline[1][2]: unknown key (expected the module name at [1] "
                         .. "and options under string keys)", perr({ { "stages.pass", "extra" } }))
      end)

      it("report a module that is not found", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: module "examples.nope" not found',
                         perr({ "examples.nope" }, { root = ORDER .. "/root" }))
      end)

      it("report a module that does not compile", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.syntax" failed to load: '
                         .. FIX .. "/stages/syntax.lua:3: unexpected symbol near '}'", perr({ "stages.syntax" }))
      end)

      it("report a module that raises, on one line", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.raises" failed to load: '
                         .. FIX .. "/stages/raises.lua:1: stage setup failed", perr({ "stages.raises" }))
        assert.are.equal('config error: listeners[1].pipeline[2]: module "stages.raises_multiline" failed to load: '
                         .. FIX .. "/stages/raises_multiline.lua:1: first line second line",
                         perr({ "stages.pass", { "stages.raises_multiline" } }))
      end)

      it("report a module that does not return a table", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.notatable" expected to return '
                         .. "a table of callbacks, got 42", perr({ "stages.notatable" }))
      end)

      it("let a Lua stage check its options, naming the key and what it expected", function()
        assert.are.equal("config error: listeners[1].pipeline[1].size: expected a positive integer, got 0",
                         perr({ { "stages.checked", size = 0 } }))
        local l = ok_of(conf({ listener({ pipeline = { { "stages.checked", size = 4 } } }) })).listeners[1]
        assert.are.equal(4, l.pipeline[1].options.size)
      end)

      it("let a Lua stage refuse a key that is none of its options", function()
        assert.are.equal('config error: listeners[1].pipeline[1].mode: unknown key ("stages.checked" takes '
                         .. "no such option)", perr({ { "stages.checked", mode = 1 } }))
        assert.are.equal('config error: listeners[1].pipeline[1].flag: unknown key ("stages.checked" takes '
                         .. "one of: size)", perr({ { "stages.checked", flag = true } }))
      end)

      it("check the options of the examples built on the decoder", function()
        assert.are.equal('config error: listeners[1].pipeline[1].max_frame_lenght: unknown key '
                         .. '("examples.length_router" takes one of: discard_after, max_cumulation, '
                         .. "max_frame_length)",
                         perr({ { "examples.length_router", max_frame_lenght = 16 } }))
        assert.are.equal("config error: listeners[1].pipeline[1].max_frame_length: expected a positive "
                         .. 'integer, got "64k"', perr({ { "examples.length_router", max_frame_length = "64k" } }))
        assert.are.equal("config error: listeners[1].pipeline[1].max_cumulation: expected a positive "
                         .. "integer, got 0", perr({ { "examples.line_rewrite", max_cumulation = 0 } }))
        assert.matches("^config error: listeners%[1%]%.pipeline%[1%]%.rules: expected a list of .*"
                       .. "malformed pattern",
                       perr({ { "examples.line_rewrite", rules = { { match = "[x", replace = "y" } } } }))
        ok_of(conf({ listener({ pipeline = { { "examples.line_rewrite", max_length = 64,
                                               rules = { { match = "a", replace = "b" } } } } }) }))
      end)

      it("report an unknown callback", function()
        assert.are.equal('config error: listeners[1].pipeline[1]: module "stages.typo" has an unknown callback '
                         .. '"channel_reed" (known: ' .. CALLBACKS .. ")", perr({ "stages.typo" }))
      end)

      it("restore package.path after loading a module", function()
        local saved = package.path
        perr({ "stages.raises" })
        assert.are.equal(saved, package.path)
      end)
    end)

    describe("upstreams", function()
      local function uerr(upstreams)
        return err_of(conf({ listener({ upstream = NONE, pipeline = { "stages.pass" } }) },
                           { upstreams = upstreams }))
      end

      it("must be a table", function()
        assert.are.equal('config error: upstreams: expected a table of upstreams keyed by name, got "demo"',
                         uerr("demo"))
      end)

      it("need well-formed names", function()
        assert.are.equal('config error: upstreams["a b"]: expected an upstream name made of letters, digits, '
                         .. '"_", "-" and ".", got "a b"', uerr({ ["a b"] = { servers = { "127.0.0.1:1" } } }))
        assert.are.equal('config error: upstreams[1]: expected an upstream name made of letters, digits, '
                         .. '"_", "-" and ".", got 1', uerr({ { servers = { "127.0.0.1:1" } } }))
      end)

      it("must be tables", function()
        assert.are.equal('config error: upstreams.demo: expected a table { servers = { "host:port", ... } }, '
                         .. 'got "127.0.0.1:1"', uerr({ demo = "127.0.0.1:1" }))
      end)

      it("reject unknown keys", function()
        assert.are.equal("config error: upstreams.demo.server: unknown key (expected one of: servers, "
                         .. "balance, connect_timeout_ms, tries, max_fails, fail_timeout_ms, health_check, "
                         .. "send_proxy, resolve_interval_ms, tls)",
                         uerr({ demo = { server = "127.0.0.1:1" } }))
      end)

      it("take tls as true or a table: files made absolute from the config's folder, defaults filled",
         function()
        local function t(v)
          return ok_of(conf(nil, { upstreams = { demo = { servers = { "127.0.0.1:1" }, tls = v } } }))
            .upstreams.demo.tls
        end
        local defaults = { verify = true, min_version = "TLSv1.2", session_reuse = true }
        assert.is_nil(t(nil))
        assert.is_nil(t(false))
        assert.are.same(defaults, t(true))
        assert.are.same(defaults, t({}))
        assert.are.same({ server_name = "api.example.com", verify = true, ca = FIX .. "/ca.pem",
                          certificate = FIX .. "/client.crt", key = "/etc/client.key",
                          ciphers = "HIGH", ciphersuites = "TLS_AES_128_GCM_SHA256",
                          min_version = "TLSv1.3", alpn = { "http/1.1" }, session_reuse = false },
                        t({ server_name = "api.example.com", ca = "ca.pem", certificate = "client.crt",
                            key = "/etc/client.key", ciphers = "HIGH",
                            ciphersuites = "TLS_AES_128_GCM_SHA256", min_version = "TLSv1.3",
                            alpn = { "http/1.1" }, session_reuse = false }))
        assert.are.same({ verify = false, min_version = "TLSv1.2", session_reuse = true },
                        t({ verify = false }))
      end)

      it("refuse a tls table that cannot work, naming the key", function()
        local function bad(v, extra)
          local u = { servers = { "127.0.0.1:1" }, tls = v }
          for k, x in pairs(extra or {}) do u[k] = x end
          return uerr({ demo = u })
        end
        assert.are.equal('config error: upstreams.demo.tls: expected true or a table { server_name, '
                         .. 'ca, ... }, got "yes"', bad("yes"))
        assert.are.equal("config error: upstreams.demo.tls.sni: unknown key (expected one of: "
                         .. "server_name, verify, ca, crl, certificate, key, ciphers, "
                         .. "ciphersuites, min_version, alpn, session_reuse)",
                         bad({ sni = "a.test" }))
        assert.are.equal('config error: upstreams.demo.tls.crl: expected no crl with verify = '
                         .. 'false (nothing is verified), got "c.crl"',
                         bad({ verify = false, crl = "c.crl" }))
        assert.are.equal('config error: upstreams.demo.tls.server_name: expected a host name '
                         .. '(not an address), got "a b"', bad({ server_name = "a b" }))
        assert.are.equal('config error: upstreams.demo.tls.server_name: expected a host name '
                         .. '(not an address), got "10.0.0.7"', bad({ server_name = "10.0.0.7" }))
        assert.are.equal('config error: upstreams.demo.tls.verify: expected a boolean, got "no"',
                         bad({ verify = "no" }))
        assert.are.equal('config error: upstreams.demo.tls.ca: expected no ca with verify = false '
                         .. '(nothing is verified), got "ca.pem"', bad({ verify = false, ca = "ca.pem" }))
        assert.are.equal("config error: upstreams.demo.tls.key: expected a non-empty string, got nil",
                         bad({ certificate = "c.crt" }))
        assert.are.equal("config error: upstreams.demo.tls.certificate: expected the client "
                         .. "certificate that goes with key, got nil", bad({ key = "c.key" }))
        assert.are.equal('config error: upstreams.demo.tls.session_reuse: expected a boolean, '
                         .. 'got 1', bad({ session_reuse = 1 }))
      end)

      it("need servers", function()
        assert.are.equal('config error: upstreams.demo.servers: expected a non-empty array of "host:port" '
                         .. "strings, got nil", uerr({ demo = {} }))
        assert.are.equal('config error: upstreams.demo.servers: expected a non-empty array of "host:port" '
                         .. "strings, got an empty table", uerr({ demo = { servers = {} } }))
        assert.are.equal('config error: upstreams.demo.servers: expected a non-empty array of "host:port" '
                         .. 'strings, got "127.0.0.1:1"', uerr({ demo = { servers = "127.0.0.1:1" } }))
        assert.are.equal("config error: upstreams.demo.servers.main: unknown key (expected an array: keys 1, 2, "
                         .. "... without gaps)", uerr({ demo = { servers = { main = "127.0.0.1:1" } } }))
      end)

      it("need host:port servers", function()
        assert.are.equal('config error: upstreams.demo.servers[2]: expected "host:port" or '
                         .. '{ "host:port", weight = n, backup = true }, got 8000',
                         uerr({ demo = { servers = { "127.0.0.1:1", 8000 } } }))
        for _, bad in ipairs({ "db_internal:5432", "-db.internal:5432", "db..internal:5432",
                               "db-.internal:5432", "1.2.3:5432", "256.1.1.1:5432",
                               ("x"):rep(64) .. ".internal:5432" }) do
          assert.are.equal('config error: upstreams["my-up"].servers[1]: expected "host:port" with host an '
                           .. 'IPv4 address, [IPv6 address], localhost or a host name, got "' .. bad .. '"',
                           uerr({ ["my-up"] = { servers = { bad } } }))
        end
      end)

      describe("given by host name", function()
        -- What a resolver answers here (sluice passes the system's: these
        -- specs check what the validation makes of the answers).
        local HOSTS = {
          ["db.internal"] = { { host = "10.0.0.5", family = "inet" },
                              { host = "fd00::5", family = "inet6" } },
          ["cache"] = { { host = "10.0.0.9", family = "inet" } },
          ["also-db."] = { { host = "10.0.0.5", family = "inet" } },
        }
        local asked = {}
        local RESOLVING = {
          config_dir = FIX, builtin = OPTS.builtin,
          resolve = function(name)
            asked[#asked + 1] = name
            if HOSTS[name] then return HOSTS[name] end
            return nil, "Name or service not known"
          end,
        }
        local function ups(upstreams, opts)
          return conf({ listener({ upstream = NONE, pipeline = { "stages.pass" } }) },
                      { upstreams = upstreams }), opts or RESOLVING
        end

        it("become one server per address, each with the entry's weight and its name", function()
          asked = {}
          local cfg = ok_of(ups({ demo = { servers = { { "db.internal:5432", weight = 3 },
                                                        "cache:6379", "10.0.0.7:5432" } } }))
          local a, b, c = addr("10.0.0.5", 5432), addr("fd00::5", 5432, "inet6"), addr("10.0.0.9", 6379)
          a.weight, a.name = 3, "db.internal:5432"
          b.weight, b.name = 3, "db.internal:5432"
          c.weight, c.name = 1, "cache:6379"
          local d = addr("10.0.0.7", 5432)
          d.weight = 1
          assert.are.same({ a, b, c, d }, cfg.upstreams.demo.servers)
          assert.are.equal(4, cfg.upstreams.demo.tries)   -- every address
          assert.are.same({ "db.internal", "cache" }, asked)
        end)

        it("are listed once in hosts, and resolved again every resolve_interval_ms", function()
          local u = ok_of(ups({ demo = { servers = { "db.internal:5432", "cache:6379",
                                                     "db.internal:5433", "10.0.0.7:1" },
                                         resolve_interval_ms = 500 } })).upstreams.demo
          assert.are.same({ "db.internal", "cache" }, u.hosts)
          assert.are.equal(500, u.resolve_interval_ms)
          assert.are.equal(0, ok_of(ups({ demo = { servers = { "cache:1" }, resolve_interval_ms = 0 } }))
            .upstreams.demo.resolve_interval_ms)
          for _, bad in ipairs({ 99, 1, -1, 1.5, "500", 2 ^ 31, 0 / 0 }) do
            assert.are.equal("config error: upstreams.demo.resolve_interval_ms: expected 0 (never) "
                             .. "or an integer from 100 to 2147483647, got "
                             .. (type(bad) == "string" and '"500"' or tostring(bad)),
                             err_of(ups({ demo = { servers = { "cache:1" }, resolve_interval_ms = bad } })))
          end
        end)

        it("get the servers of new answers from reexpand, the rest of the upstream unchanged",
          function()
            local cfg = ok_of(ups({ demo = { servers = { { "db.internal:5432", weight = 2 },
                                                         "10.0.0.7:5432" }, tries = 9 },
                                    plain = { servers = { "10.0.0.8:1" } },
                                    never = { servers = { "db.internal:1" }, resolve_interval_ms = 0 } }))
            local answers = { ["db.internal"] = { { host = "10.0.0.6", family = "inet" },
                                                  { host = "10.0.0.7", family = "inet" },
                                                  { host = "10.0.0.8", family = "inet" } } }
            local function resolve(name) return answers[name], "gone" end
            local out = assert(config.reexpand(cfg, resolve))
            local a, b, c, d = addr("10.0.0.6", 5432), addr("10.0.0.7", 5432), addr("10.0.0.8", 5432),
                               addr("10.0.0.7", 5432)
            a.weight, a.name, b.weight, b.name, c.weight, c.name = 2, "db.internal:5432", 2,
              "db.internal:5432", 2, "db.internal:5432"
            d.weight = 1
            -- The literal address the name now has too stays one server (the first entry's).
            assert.are.same({ a, b, c }, out.demo.servers)
            assert.are.equal(3, out.demo.tries)
            assert.are.equal(cfg.upstreams.plain, out.plain)
            assert.are.equal(cfg.upstreams.never, out.never)   -- resolved again only by a reload
            assert.are.equal(3, #cfg.upstreams.demo.servers)   -- the running table is not touched
            answers["db.internal"] = nil
            assert.are.same({ nil, 'config error: upstreams.demo.servers[1][1]: cannot resolve '
                                   .. '"db.internal": gone' }, { config.reexpand(cfg, resolve) })
          end)

        it("make every address of a name given with backup = true a backup, again in reexpand",
          function()
            local cfg = ok_of(ups({ demo = { servers = { "cache:6379",
                                                         { "db.internal:5432", backup = true } } } }))
            local a, b, c = addr("10.0.0.9", 6379), addr("10.0.0.5", 5432), addr("fd00::5", 5432, "inet6")
            a.weight, a.name = 1, "cache:6379"
            b.weight, b.name, b.backup = 1, "db.internal:5432", true
            c.weight, c.name, c.backup = 1, "db.internal:5432", true
            assert.are.same({ a, b, c }, cfg.upstreams.demo.servers)
            local answers = { cache = { { host = "10.0.0.10", family = "inet" } },
                              ["db.internal"] = { { host = "10.0.0.6", family = "inet" } } }
            local function resolve(name) return answers[name], "gone" end
            local out = assert(config.reexpand(cfg, resolve))
            local d, e = addr("10.0.0.10", 6379), addr("10.0.0.6", 5432)
            d.weight, d.name = 1, "cache:6379"
            e.weight, e.name, e.backup = 1, "db.internal:5432", true
            assert.are.same({ d, e }, out.demo.servers)
            -- The primary's address now answered for the backup's name
            -- first: it is one server, and a primary (any entry that
            -- reaches it as a primary makes it one).
            local both = ok_of(ups({ demo = { servers = { { "db.internal:6379", backup = true },
                                                          "cache:6379" } } }))
            answers = { cache = { { host = "10.0.0.6", family = "inet" } },
                        ["db.internal"] = { { host = "10.0.0.6", family = "inet" } } }
            local one = assert(config.reexpand(both, resolve))
            local f = addr("10.0.0.6", 6379)
            f.weight, f.name = 1, "db.internal:6379"
            assert.are.same({ f }, one.demo.servers)
            -- So is a listed primary that a backup's name resolves to.
            local listed = ok_of(ups({ demo = { servers = { { "db.internal:5432", backup = true },
                                                            "10.0.0.5:5432" } } }))
            assert.is_nil(listed.upstreams.demo.servers[1].backup)
            assert.are.equal(2, #listed.upstreams.demo.servers)   -- 10.0.0.5 and fd00::5
          end)

        it("count every address for tries, a tries above them being all of them", function()
          assert.are.equal(2, ok_of(ups({ demo = { servers = { "db.internal:5432" }, tries = 2 } }))
            .upstreams.demo.tries)
          -- The name had more addresses yesterday: the reload is not refused.
          assert.are.equal(2, ok_of(ups({ demo = { servers = { "db.internal:5432" }, tries = 3 } }))
            .upstreams.demo.tries)
          assert.are.equal("config error: upstreams.demo.tries: expected an integer from 1 to 2 (the number "
                           .. "of servers), got 0",
                           err_of(ups({ demo = { servers = { "db.internal:5432" }, tries = 0 } })))
          assert.are.equal("config error: upstreams.demo.tries: expected an integer from 1 to 1 (the number "
                           .. "of servers), got 2",
                           err_of(ups({ demo = { servers = { "127.0.0.1:1" }, tries = 2 } })))
        end)

        it("fail with the resolver's message, naming the entry", function()
          assert.are.equal('config error: upstreams.demo.servers[2]: cannot resolve "nowhere.internal": '
                           .. "Name or service not known",
                           err_of(ups({ demo = { servers = { "cache:1", "nowhere.internal:1" } } })))
          assert.are.equal('config error: upstreams.demo.servers[1][1]: cannot resolve "nowhere": '
                           .. "Name or service not known",
                           err_of(ups({ demo = { servers = { { "nowhere:1", weight = 2 } } } })))
        end)

        it("are refused without a resolver", function()
          assert.are.equal('config error: upstreams.demo.servers[1]: cannot resolve "cache": host names are '
                           .. "resolved by sluice itself (this validation has no resolver)",
                           err_of(ups({ demo = { servers = { "cache:1" } } }, OPTS)))
        end)

        it("keep an address reached twice through names once; addresses given twice are refused", function()
          local servers = ok_of(ups({ demo = { servers = { "db.internal:5432", "also-db.:5432",
                                                            "10.0.0.5:5432" } } })).upstreams.demo.servers
          assert.are.same({ "10.0.0.5:5432", "[fd00::5]:5432" }, { servers[1].text, servers[2].text })
          assert.are.equal(2, #servers)
          assert.are.equal('config error: upstreams.demo.servers[2]: expected each address once, got '
                           .. '"127.0.0.1:1", which upstreams.demo.servers[1] has already',
                           err_of(ups({ demo = { servers = { "localhost:1", "127.0.0.1:1" } } })))
          -- The same address in two upstreams is fine.
          ok_of(ups({ a = { servers = { "cache:1" } }, b = { servers = { "cache:1" } } }))
        end)

        it("are not listening addresses", function()
          assert.are.equal('config error: listeners[1].listen: expected "host:port" with host an IPv4 '
                           .. 'address, [IPv6 address], localhost or *, got "cache:7000"',
                           err_of(conf({ listener({ listen = "cache:7000" }) }), RESOLVING))
        end)
      end)

      it("need servers to connect to, not wildcards", function()
        for _, server in ipairs({ "*:80", "0.0.0.0:80", "[::]:80", "[0:0::0]:80" }) do
          assert.are.equal('config error: upstreams.demo.servers[1]: expected "host:port" with a host to '
                           .. 'connect to (not *, 0.0.0.0 or [::]), got "' .. server .. '"',
                           uerr({ demo = { servers = { server } } }))
        end
      end)

      it("need servers given as tables to hold an address and an optional weight", function()
        local function serr(entry)
          return uerr({ demo = { servers = { "127.0.0.1:1", entry } } })
        end
        assert.are.equal('config error: upstreams.demo.servers[2][1]: expected "host:port", got nil',
                         serr({ weight = 2 }))
        assert.are.equal('config error: upstreams.demo.servers[2][1]: expected "host:port", got 8000',
                         serr({ 8000 }))
        assert.are.equal('config error: upstreams.demo.servers[2][1]: expected "host:port" with a port from '
                         .. '1 to 65535, got "127.0.0.1:0"', serr({ "127.0.0.1:0" }))
        assert.are.equal("config error: upstreams.demo.servers[2].wieght: unknown key (expected the address "
                         .. "at [1], an optional weight and an optional backup)",
                         serr({ "127.0.0.1:2", wieght = 2 }))
        assert.are.equal("config error: upstreams.demo.servers[2][2]: unknown key (expected the address "
                         .. "at [1], an optional weight and an optional backup)",
                         serr({ "127.0.0.1:2", "127.0.0.1:3" }))
        for _, w in ipairs({ 0, 1.5, 1001, -1 }) do
          assert.are.equal("config error: upstreams.demo.servers[2].weight: expected an integer from 1 "
                           .. "to 1000, got " .. tostring(w), serr({ "127.0.0.1:2", weight = w }))
        end
        assert.are.equal('config error: upstreams.demo.servers[2].weight: expected an integer from 1 '
                         .. 'to 1000, got "2"', serr({ "127.0.0.1:2", weight = "2" }))
      end)

      it("mark backup servers with backup = true, a boolean", function()
        local cfg = ok_of(conf({ listener({ upstream = NONE, pipeline = { "stages.pass" } }) },
          { upstreams = { demo = { servers = { "127.0.0.1:1", { "127.0.0.1:2", backup = false },
                                               { "127.0.0.1:3", weight = 2, backup = true } } } } }))
        local a, b, c = addr("127.0.0.1", 1), addr("127.0.0.1", 2), addr("127.0.0.1", 3)
        a.weight, b.weight, c.weight, c.backup = 1, 1, 2, true
        assert.are.same({ a, b, c }, cfg.upstreams.demo.servers)
        assert.are.equal(3, cfg.upstreams.demo.tries)   -- backups count for tries
        local function serr(entry)
          return uerr({ demo = { servers = { "127.0.0.1:1", entry } } })
        end
        for _, bad in ipairs({ '"yes"', "1", "0", "{}" }) do
          local v = assert(loadstring("return " .. bad))()
          assert.are.equal("config error: upstreams.demo.servers[2].backup: expected a boolean, got "
                           .. (bad == "{}" and "an empty table" or bad),
                           serr({ "127.0.0.1:2", backup = v }))
        end
        assert.are.equal("config error: upstreams.demo.servers[1].bakup: unknown key (expected the address "
                         .. "at [1], an optional weight and an optional backup)",
                         uerr({ demo = { servers = { { "127.0.0.1:2", bakup = true } } } }))
      end)

      it("refuse an upstream whose servers are all backups", function()
        assert.are.equal("config error: upstreams.demo.servers: expected at least one server without "
                         .. "backup = true, got 2 backup servers only",
                         uerr({ demo = { servers = { { "127.0.0.1:1", backup = true },
                                                     { "127.0.0.1:2", backup = true } } } }))
        assert.are.equal("config error: upstreams.demo.servers: expected at least one server without "
                         .. "backup = true, got 1 backup server only",
                         uerr({ demo = { servers = { { "127.0.0.1:1", backup = true } } } }))
      end)

      it("need a known balance", function()
        assert.are.equal('config error: upstreams.demo.balance: expected one of "round_robin", "least_conn", '
                         .. '"hash", "random_two", got "rr"',
                         uerr({ demo = { servers = { "127.0.0.1:1" }, balance = "rr" } }))
        assert.are.equal('config error: upstreams.demo.balance: expected one of "round_robin", "least_conn", '
                         .. '"hash", "random_two", got 1',
                         uerr({ demo = { servers = { "127.0.0.1:1" }, balance = 1 } }))
      end)

      it("need tries from 1 to the number of servers", function()
        local two = { "127.0.0.1:1", "127.0.0.1:2" }
        for _, t in ipairs({ 0, 3, 1.5 }) do
          assert.are.equal("config error: upstreams.demo.tries: expected an integer from 1 to 2 (the number "
                           .. "of servers), got " .. tostring(t), uerr({ demo = { servers = two, tries = t } }))
        end
        assert.are.equal('config error: upstreams.demo.tries: expected an integer from 1 to 2 (the number '
                         .. 'of servers), got "2"', uerr({ demo = { servers = two, tries = "2" } }))
      end)

      it("need max_fails from 0 and a positive fail_timeout_ms", function()
        assert.are.equal("config error: upstreams.demo.max_fails: expected an integer from 0 to 2147483647, "
                         .. "got -1", uerr({ demo = { servers = { "127.0.0.1:1" }, max_fails = -1 } }))
        assert.are.equal("config error: upstreams.demo.max_fails: expected an integer from 0 to 2147483647, "
                         .. "got true", uerr({ demo = { servers = { "127.0.0.1:1" }, max_fails = true } }))
        assert.are.equal("config error: upstreams.demo.fail_timeout_ms: expected a positive integer, got 0",
                         uerr({ demo = { servers = { "127.0.0.1:1" }, fail_timeout_ms = 0 } }))
      end)

      it("need a well-formed health_check", function()
        local function herr(h)
          return uerr({ demo = { servers = { "127.0.0.1:1" }, health_check = h } })
        end
        assert.are.equal("config error: upstreams.demo.health_check: expected a table { interval_ms = n, "
                         .. "timeout_ms = n, fails = n, passes = n }, got true", herr(true))
        assert.are.equal("config error: upstreams.demo.health_check.interval: unknown key (expected one of: "
                         .. "interval_ms, timeout_ms, fails, passes, send, expect, steps)",
                         herr({ interval = 1 }))
        assert.are.equal("config error: upstreams.demo.health_check.send: expected a string of 1 to 1024 "
                         .. "bytes, got 42", herr({ send = 42 }))
        assert.are.equal("config error: upstreams.demo.health_check.expect: expected a string of 1 to 256 "
                         .. 'bytes, got ""', herr({ expect = "" }))
        assert.matches("^config error: upstreams.demo.health_check.expect: expected a string of 1 to 256 ",
                       herr({ expect = ("x"):rep(257) }))
        assert.are.equal("config error: upstreams.demo.health_check.interval_ms: expected a positive "
                         .. "integer, got 0", herr({ interval_ms = 0 }))
        assert.are.equal("config error: upstreams.demo.health_check.timeout_ms: expected a positive "
                         .. "integer, got -5", herr({ timeout_ms = -5 }))
        assert.are.equal("config error: upstreams.demo.health_check.timeout_ms: expected at most "
                         .. "interval_ms (100), got 200", herr({ interval_ms = 100, timeout_ms = 200 }))
        assert.are.equal("config error: upstreams.demo.health_check.timeout_ms: expected at most "
                         .. "interval_ms (2000), got 3000", herr({ timeout_ms = 3000 }))
        assert.are.equal("config error: upstreams.demo.health_check.fails: expected a positive "
                         .. "integer, got 0", herr({ fails = 0 }))
        assert.are.equal("config error: upstreams.demo.health_check.passes: expected a positive "
                         .. "integer, got 2.5", herr({ passes = 2.5 }))
      end)

      it("need health_check.steps as an array of steps, each with one kind, and not with send/expect",
         function()
        local function serr(steps, extra)
          local h = { steps = steps }
          for k, v in pairs(extra or {}) do h[k] = v end
          return uerr({ demo = { servers = { "127.0.0.1:1" }, health_check = h } })
        end
        local P = "config error: upstreams.demo.health_check.steps"
        assert.are.equal(P .. ': expected a non-empty array of steps ({ send = "..." }, { expect = "..." }, '
                         .. '{ expect_regex = "..." }), got an empty table', serr({}))
        assert.are.equal(P .. ': expected a non-empty array of steps ({ send = "..." }, { expect = "..." }, '
                         .. '{ expect_regex = "..." }), got "PING"', serr("PING"))
        assert.are.equal(P .. "[3]: unknown key (expected an array: keys 1, 2, ... without gaps)",
                         serr({ { send = "a" }, [3] = { expect = "b" } }))
        local many = {}
        for i = 1, 33 do many[i] = { send = "x" } end
        assert.are.equal(P .. ": expected at most 32 steps, got 33", serr(many))
        assert.are.equal(P .. '[2]: expected a table { send = "..." }, { expect = "..." } or '
                         .. '{ expect_regex = "..." }, got "+PONG"', serr({ { send = "PING\r\n" }, "+PONG" }))
        assert.are.equal(P .. "[1]: expected exactly one of send, expect, expect_regex, got none",
                         serr({ {} }))
        assert.are.equal(P .. "[2]: expected exactly one of send, expect, expect_regex, got send and expect",
                         serr({ { send = "a" }, { send = "b", expect = "c" } }))
        assert.are.equal(P .. "[1].expct: unknown key (expected one of: send, expect, expect_regex)",
                         serr({ { expct = "+PONG" } }))
        assert.are.equal(P .. "[1].send: expected a string of 1 to 1024 bytes, got 42", serr({ { send = 42 } }))
        assert.are.equal(P .. '[2].expect: expected a string of 1 to 256 bytes, got ""',
                         serr({ { send = "a" }, { expect = "" } }))
        assert.are.equal(P .. "[1].expect_regex: expected a string of 1 to 256 bytes, got true",
                         serr({ { expect_regex = true } }))
        assert.are.equal(P .. '[1].expect_regex: expected a regular expression without NUL bytes, got "a\\000"',
                         serr({ { expect_regex = "a\0" } }))
        assert.are.equal("config error: upstreams.demo.health_check.send: expected no send with steps (make "
                         .. 'it a step: { send = ... }), got "PING"', serr({ { expect = "+PONG" } }, { send = "PING" }))
        assert.are.equal("config error: upstreams.demo.health_check.expect: expected no expect with steps "
                         .. '(make it a step: { expect = ... }), got "+PONG"',
                         serr({ { send = "PING" } }, { expect = "+PONG" }))
      end)

      it("need a positive integer connect_timeout_ms", function()
        assert.are.equal("config error: upstreams.demo.connect_timeout_ms: expected a positive integer, got 1.5",
                         uerr({ demo = { servers = { "127.0.0.1:1" }, connect_timeout_ms = 1.5 } }))
        assert.are.equal("config error: upstreams.demo.connect_timeout_ms: expected a positive integer, got -1",
                         uerr({ demo = { servers = { "127.0.0.1:1" }, connect_timeout_ms = -1 } }))
      end)

      it("are checked in name order", function()
        assert.matches("^config error: upstreams%.a%.servers:",
                       uerr({ b = { servers = {} }, a = { servers = {} } }))
      end)
    end)

    it("shows strings escaped on one line", function()
      assert.are.equal('config error: listeners[1].listen: expected "host:port", got "a\\nb\\"c\\\\\\000"',
                       err_of(conf({ listener({ listen = 'a\nb"c\\\0' }) })))
    end)

    it("shows functions and tables by kind", function()
      assert.are.equal("config error: listeners[1].listen: expected \"host:port\", got a function",
                       err_of(conf({ listener({ listen = print }) })))
      assert.are.equal("config error: listeners[1].listen: expected \"host:port\", got a table",
                       err_of(conf({ listener({ listen = { "127.0.0.1", 7000 } }) })))
    end)
  end)
end)
