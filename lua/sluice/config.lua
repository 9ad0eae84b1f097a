-- sluice.config: load, validate and normalize a sluice configuration file.
--
-- The configuration is a Lua file that returns a table. `load` runs it in an
-- environment of its own, `validate` checks the table against the schema below
-- and returns a new, normalized table that the C core reads with the classic
-- Lua C API. Pure Lua 5.1 / LuaJIT: no FFI, no C modules.
--
--   local cfg, err = config.load(path, opts)
--   local cfg, err = config.validate(tbl, opts)
--   local sp       = config.search_path(opts)
--
--   opts.root       sluice's own folder (holds lua/ and examples/), optional
--   opts.config_dir folder of the configuration file, optional (`load`
--                   derives it from `path` when absent)
--   opts.builtin    set of stage names implemented in C: { [name] = true }
--   opts.instruction_limit  Lua instructions a load or validation may run,
--                   optional (default 100 million; see below)
--
-- A load or a validation runs user code (the file, the stage modules it
-- names, their check_options) on the thread that also takes sluice's
-- signals, so one that never ends would hang `--check`, the start, or a
-- reload together with the SIGTERM after it. It runs with the JIT off
-- (compiled code runs no hooks) under a count hook: once user code has run
-- past the limit it fails with `still running after N Lua instructions (a
-- loop that never ends?)`. The validation's own work is not counted.
--
-- Errors. On failure `load` and `validate` return nil and exactly one line:
--
--   config error: <key path>: expected <what>, got <value>
--
-- <key path> is written as Lua would index it (`listeners[1].listen`,
-- `upstreams["my-up"].servers[2]`), or `top level` for the table itself.
-- <value> is shown as Lua would write it: strings double-quoted and escaped,
-- numbers and booleans as is, `nil`, `a table` (`an empty table`),
-- `a function`. Errors in the file itself are `config error: <path>: <msg>`.
--
-- Schema (unknown keys are errors at every level):
--
--   listeners   required non-empty array of listeners:
--     name            required non-empty string of letters, digits, "_", "-"
--                     and ".", unique
--     listen          required "host:port": IPv4, [IPv6], localhost (becomes
--                     127.0.0.1) or * / 0.0.0.0; port 1-65535; unique
--     upstream        optional name of an upstream
--     pipeline        optional array of stages: "module.name" or
--                     { "module.name", option = value, ... }
--     low_water_mark  optional positive integer, default 524288 (or
--                     high_water_mark when that is smaller)
--     high_water_mark optional positive integer, default 1048576
--     outbound_limit  optional positive integer, at least high_water_mark,
--                     default 16777216: a connection whose outbound queue
--                     would grow above it is closed (reason outbound_limit)
--     write_spin_count optional positive integer, default 16: sendmsg calls
--                     per connection per loop iteration
--     max_bytes_per_gathering_write optional positive integer: bytes per
--                     sendmsg call; absent, it adapts (from 2 x SO_SNDBUF)
--     max_connections optional positive integer: open client connections
--                     of this listener (all workers together) at which
--                     accepting pauses; default 0 (no limit)
--     connect_timeout_ms optional positive integer: overrides the upstream's
--                     connect timeout for this listener's connections
--     idle_timeout_ms optional positive integer: a client connection with
--                     no bytes either way for this long is closed; default
--                     0 (none)
--     defer_accept    optional boolean, default false: TCP_DEFER_ACCEPT
--                     (1 s), the kernel hands over a connection once its
--                     client has sent something (for protocols where the
--                     client speaks first)
--     half_close_timeout_ms optional positive integer: once one direction
--                     has ended (a FIN either way), the idle timeout of the
--                     client connection becomes this when shorter; default
--                     0 (idle_timeout_ms goes on)
--     tcp_keepalive   optional boolean or table { idle_ms, interval_ms,
--                     count } (each optional; the system's setting when
--                     absent): TCP keepalive on the client and upstream
--                     sockets; default false
--     splice          optional boolean or "auto", default "auto": a
--                     pass-through connection (no pipeline) moves bulk
--                     bytes socket to socket with splice(2), without
--                     copying them; "auto" splices only into a peer that
--                     is not on the loopback interface
--     (and at least an upstream or a non-empty pipeline)
--   upstreams   optional table keyed by name ([%w_%-%.]+):
--     servers            required non-empty array of "host:port" (no wildcard)
--                        or { "host:port", weight = 1..1000 } (weight 1)
--     balance            optional "round_robin" (default), "least_conn",
--                        "hash" (on the client address) or "random_two"
--     connect_timeout_ms optional positive integer, default 5000
--     tries              optional integer 1..#servers, default #servers
--     max_fails          optional integer 0..2^31-1, default 1 (0: never)
--     fail_timeout_ms    optional positive integer, default 10000
--     send_proxy         optional "v1" or "v2": a PROXY protocol header first
--                        on every connection to the servers (and health checks)
--     health_check       optional table: interval_ms (2000), timeout_ms
--                        (1000, at most interval_ms), fails (3), passes (2),
--                        send (bytes to write once connected), expect (bytes
--                        the answer must contain): strings, optional
--   log_level   optional "debug", "info", "warn" or "error", default "info"
--   workers     optional integer 1-256, default 0 (one per core)
--   drain_timeout_ms optional integer 0-2^31-1: how long a stop waits for
--               open connections, default 10000
--   error_log   optional "stderr" or a file path, default "stderr"
--   access_log  optional "off", "stderr" or a file path, default "off"
--   max_pipes   optional integer 0-2^31-1: splice pipes open at once, all
--               workers together (at most 1024 per worker); 0 turns
--               splicing off; absent (nil): a quarter of the open-files limit
--   lua_memory_limit optional integer: bytes each worker's Lua heap may
--               hold, 0 (the default: no limit) or 1 MiB-2^53; a stage whose
--               event leaves the heap above it (after a full collection)
--               fails with "not enough memory", which closes that
--               connection; an allocation past twice it is refused
--   lua_timeout_ms optional integer 0-2^31-1: a Lua callback running longer
--               is stopped (it raises, its connection closes), default 5000;
--               0: never
--   admin       optional table: the admin endpoint (/metrics, /memory,
--               /upstreams, /health); off when absent:
--     listen          required "host:port"; a loopback host (127.0.0.0/8,
--                     [::1], localhost) unless public is true
--     public          optional boolean, default false: allow any address
--   allocator   optional table: type ("pooled" | "unpooled"), arenas (0: one
--               per worker), page_size (power of two, 4 KiB-1 MiB, 8 KiB),
--               chunk_size (power of two, >= 16 pages, <= 32 MiB, 4 MiB), small_cache
--               (256), normal_cache (64), max_cached (32768), trim_interval
--               (8192), trim_idle_ms (10000), max_memory (0: no limit)
--   leak_detection  optional "disabled", "simple" (default), "advanced",
--               "paranoid", or { level = ..., sample_rate = 128 }
--   Stage options (string keys of a pipeline entry) are plain data: strings,
--   numbers, booleans and tables of them. The options of the built-in C
--   codecs are checked here too (see C_STAGE_OPTIONS; the C stages check
--   them again at load, with the same messages):
--     sluice.codec.length_field  max_frame_length (required), length_field_offset
--         (0), length_field_length (1, 2, 3, 4 or 8; 4), byte_order ("big" or
--         "little"; "big"), length_adjustment (0), initial_bytes_to_strip (0),
--         fail_fast (true)
--     sluice.codec.line          max_length (required), strip_delimiter (true),
--         fail_fast (false)
--     sluice.codec.delimiter     delimiters (required: non-empty strings),
--         max_frame_length (required), strip_delimiter (true), fail_fast (true)
--     sluice.codec.fixed_length  frame_length (required)
--     sluice.codec.length_field_prepender  length_field_length, byte_order,
--         length_adjustment (as length_field)
--
-- Positive integers are 1..2^31-1 so that they fit a C int.
--
-- Check order (so the first error reported is deterministic): unknown keys of
-- the top level, then log_level, allocator, leak_detection, workers,
-- drain_timeout_ms, error_log, access_log, admin, max_pipes, lua_memory_limit, lua_timeout_ms,
-- upstreams
-- (by sorted name),
-- listeners (in array order). Inside each table: unknown keys first (the smallest unknown key
-- is reported, numbers before strings), then the known keys in the order
-- listed above; for a listener, then low <= high, then high <=
-- outbound_limit, then max_connections and idle_timeout_ms, then "an
-- upstream or a pipeline". A stage is resolved (and its module run) when its
-- entry is checked.
--
-- Normalized result (a new table; the input is never modified):
--
--   { log_level, search_path, workers, drain_timeout_ms, error_log, access_log,
--     max_pipes (or nil: from the open-files limit), lua_memory_limit (0: none),
--     lua_timeout_ms (0: none),
--     admin = { listen = address, public } (or nil),
--     listeners = { { name, listen = address, upstream (or nil), pipeline =
--                     { { module, kind = "lua", file, options } or
--                       { module, kind = "c", options } }, low_water_mark,
--                     high_water_mark, outbound_limit, write_spin_count,
--                     max_bytes_per_gathering_write (or nil: adaptive),
--                     max_connections, idle_timeout_ms, connect_timeout_ms,
--                     defer_accept, splice, half_close_timeout_ms,
--                     tcp_keepalive (false or { idle_ms, interval_ms, count },
--                     0: the system's) } },
--     upstreams = { [name] = { name, servers = { address with weight },
--                   balance, connect_timeout_ms, tries, max_fails,
--                   fail_timeout_ms, health_check (or nil) =
--                   { interval_ms, timeout_ms, fails, passes } } },
--     upstream_names = { sorted names } }
--
--   address = { host (no brackets), port, text ("h:p" or "[h6]:p"),
--               family = "inet" or "inet6" }; IPv6 hosts in RFC 5952 form.
--
-- Bad arguments (opts of the wrong type) are programming errors and raise.

local _M = {}

local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local pcall = pcall
local error = error
local tostring = tostring
local tonumber = tonumber
local loadfile = loadfile
local setfenv = setfenv
local setmetatable = setmetatable
local getmetatable = getmetatable
local format = string.format
local byte = string.byte
local concat = table.concat
local sort = table.sort
local floor = math.floor
local ceil = math.ceil
local unpack = unpack
local maxn = table.maxn
local gethook, sethook, getinfo = debug.gethook, debug.sethook, debug.getinfo
local jit = jit
local package = package  -- package.path is read at call time, never cached
local searchpath = package.searchpath
local _G = _G

-- The environment that configuration files and stage modules run in: reads
-- fall through to the real globals, writes (including `_G.x = ...`) stay in
-- the sandbox. Library tables (string, math, ...) are shared, not copied.
local function sandbox()
    local env = setmetatable({}, { __index = _G })
    env._G = env
    return env
end

local Failure = {}  -- metatable tagging the error objects thrown by fail()

local DEFAULT_LOG_LEVEL = "info"
-- 1 MiB: a read burst (16 reads of up to 64 KiB) goes out in one gathered
-- write instead of one write per read; see docs/operations.md (Tuning).
local DEFAULT_LOW_WATER_MARK = 524288
local DEFAULT_HIGH_WATER_MARK = 1048576
local DEFAULT_OUTBOUND_LIMIT = 16 * 1024 * 1024
local DEFAULT_WRITE_SPIN_COUNT = 16
local DEFAULT_CONNECT_TIMEOUT_MS = 5000
local DEFAULT_MAX_FAILS = 1
local DEFAULT_FAIL_TIMEOUT_MS = 10000
local MAX_WEIGHT = 1000
local HEALTH_DEFAULTS = { interval_ms = 2000, timeout_ms = 1000, fails = 3, passes = 2 }
local DEFAULT_DRAIN_TIMEOUT_MS = 10000
-- About a quarter of a second of interpreted Lua here: thousands of times
-- what a configuration and its stage modules take.
local DEFAULT_INSTRUCTION_LIMIT = 100000000
local HOOK_STEP = 100000
local MAX_WORKERS = 256
local MAX_INT = 2147483647  -- integers must fit a C int
local MIN_LUA_MEMORY = 1048576
local DEFAULT_LUA_TIMEOUT_MS = 5000

local LOG_LEVELS = { "debug", "info", "warn", "error" }

-- Known keys of each table, in check order (also the order shown in errors).
local TOP_KEYS = { "listeners", "upstreams", "log_level", "allocator", "leak_detection",
                   "workers", "drain_timeout_ms", "error_log", "access_log", "admin",
                   "max_pipes", "lua_memory_limit", "lua_timeout_ms" }
local ADMIN_KEYS = { "listen", "public" }
local LEAK_LEVELS = { "disabled", "simple", "advanced", "paranoid" }
local LEAK_KEYS = { "level", "sample_rate" }
local ALLOCATOR_KEYS = { "type", "arenas", "page_size", "chunk_size", "small_cache",
                         "normal_cache", "max_cached", "trim_interval", "trim_idle_ms",
                         "max_memory" }
local LISTENER_KEYS = { "name", "listen", "upstream", "pipeline",
                        "low_water_mark", "high_water_mark", "outbound_limit",
                        "write_spin_count", "max_bytes_per_gathering_write",
                        "max_connections", "idle_timeout_ms", "connect_timeout_ms",
                        "defer_accept", "splice", "half_close_timeout_ms", "tcp_keepalive" }
local KEEPALIVE_KEYS = { "idle_ms", "interval_ms", "count" }
local MAX_KEEPALIVE_MS = 32767000  -- TCP_KEEPIDLE and TCP_KEEPINTVL take up to 32767 s
local MAX_KEEPALIVE_COUNT = 127
local UPSTREAM_KEYS = { "servers", "balance", "connect_timeout_ms", "tries", "max_fails",
                        "fail_timeout_ms", "health_check", "send_proxy" }
local BALANCES = { "round_robin", "least_conn", "hash", "random_two" }
local HEALTH_KEYS = { "interval_ms", "timeout_ms", "fails", "passes", "send", "expect" }

-- Callback names a Lua stage module may define (function-valued fields):
-- the events, and added/removed (the stage joined or left a pipeline, as
-- sluice.codec.decoder defines them).
local CALLBACKS = { "channel_active", "channel_inactive", "channel_read",
                    "channel_read_complete", "channel_writability_changed",
                    "user_event", "error", "write", "flush", "close", "read", "added", "removed",
                    "check_options" }

local function set_of(list)
    local set = {}
    for _, v in ipairs(list) do set[v] = true end
    return set
end

local LOG_LEVEL_SET = set_of(LOG_LEVELS)
local CALLBACK_SET = set_of(CALLBACKS)


---------------------------------------------------------------------------
-- Formatting
---------------------------------------------------------------------------

local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n',
                  ['\r'] = '\\r', ['\t'] = '\\t' }

-- Returns s in double quotes, escaped so the result stays on one line.
local function quote(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return ESCAPES[c] or format("\\%03d", byte(c))
    end) .. '"'
end

-- Returns a one-line rendering of any value for the "got ..." part.
local function show(v)
    local t = type(v)
    if t == "string" then
        return quote(v)
    elseif t == "number" or t == "boolean" or t == "nil" then
        return tostring(v)
    elseif t == "table" then
        return next(v) == nil and "an empty table" or "a table"
    end
    return "a " .. t  -- function, userdata, thread
end

-- Returns the path of `key` inside the table at `parent` ("" = top level).
local function key_path(parent, key)
    if type(key) == "string" and key:find("^[%a_][%w_]*$") then
        return parent == "" and key or parent .. "." .. key
    elseif type(key) == "number" and key == floor(key) then
        return format("%s[%d]", parent, key)
    end
    return format("%s[%s]", parent, show(key))
end

-- A total order on table keys of mixed types, for deterministic reports.
local function key_less(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    if ta == "boolean" then return not a and b end
    return tostring(a) < tostring(b)
end

local function sorted_keys(t, filter)
    local keys = {}
    for k, v in pairs(t) do
        if not filter or filter(k, v) then keys[#keys + 1] = k end
    end
    sort(keys, key_less)
    return keys
end

local function one_line(s)
    return (s:gsub("%s*\n%s*", " "))
end

-- Raises a validation failure at `path` (a key path, "" = top level).
-- Caught by validate(), which turns it into `nil, msg`.
local function fail(path, fmt, ...)
    local msg = format("config error: %s: %s",
                       path == "" and "top level" or path, format(fmt, ...))
    error(setmetatable({ msg = one_line(msg) }, Failure), 0)
end


---------------------------------------------------------------------------
-- Scalar checks
---------------------------------------------------------------------------

-- Raises unless every key of t is in `known` (a list). Smallest key first.
local function check_keys(t, path, known)
    local set = set_of(known)
    local unknown = sorted_keys(t, function(k) return not set[k] end)
    if unknown[1] ~= nil then
        fail(key_path(path, unknown[1]), "unknown key (expected one of: %s)",
             concat(known, ", "))
    end
end

-- Raises unless the keys of table t are exactly 1..n. Returns n.
local function check_array(t, path)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    local bad = sorted_keys(t, function(k)
        return type(k) ~= "number" or k < 1 or k > n or k ~= floor(k)
    end)
    if bad[1] ~= nil then
        fail(key_path(path, bad[1]),
             "unknown key (expected an array: keys 1, 2, ... without gaps)")
    end
    return n
end

-- Returns v if it is an integer in 1..MAX_INT, `default` if v is nil.
local function check_positive_int(v, path, default)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v < 1 or v ~= floor(v) then
        fail(path, "expected a positive integer, got %s", show(v))
    end
    if v > MAX_INT then
        fail(path, "expected a positive integer no larger than %d, got %s",
             MAX_INT, show(v))
    end
    return v
end


-- Returns v if it is an integer in 0..max, `default` if v is nil.
local function check_count(v, path, default, max)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v < 0 or v ~= floor(v) or v > max then
        fail(path, "expected an integer from 0 to %d, got %s", max, show(v))
    end
    return v
end

-- Returns v if it is a power of two in lo..hi, `default` if v is nil.
local function check_pow2(v, path, default, lo, hi)
    if v == nil then return default end
    local ok = type(v) == "number" and v >= lo and v <= hi and v == floor(v)
    if ok then
        local x = v
        while x > 1 and x % 2 == 0 do x = x / 2 end
        ok = x == 1
    end
    if not ok then
        fail(path, "expected a power of two from %d to %d, got %s", lo, hi, show(v))
    end
    return v
end


---------------------------------------------------------------------------
-- Addresses
---------------------------------------------------------------------------

-- Returns the canonical text of a dotted-quad IPv4 address, or nil.
-- Octets are 0-255 without leading zeros (inet_pton rejects them too).
local function parse_ipv4(s)
    local o = { s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
    if #o ~= 4 then return nil end
    for i = 1, 4 do
        if #o[i] > 3 or (#o[i] > 1 and o[i]:sub(1, 1) == "0")
           or tonumber(o[i]) > 255 then
            return nil
        end
        o[i] = tonumber(o[i])
    end
    return concat(o, "."), o
end

-- Appends the 16-bit groups of "h:h:...:h" (or "") to out. Returns false on
-- a malformed group.
local function hex_groups(s, out)
    if s == "" then return true end
    for g in (s .. ":"):gmatch("([^:]*):") do
        if not g:find("^%x%x?%x?%x?$") then return false end
        out[#out + 1] = tonumber(g, 16)
    end
    return true
end

-- Returns the canonical (RFC 5952: lower case, no leading zeros, longest run
-- of two or more zero groups as "::") text of an IPv6 address, or nil.
-- Accepts "::" compression and an embedded IPv4 tail; no zone ids.
local function parse_ipv6(s)
    if s:find("[^%x:%.]") then return nil end
    local groups, tail = {}, {}
    if s:find(".", 1, true) then  -- embedded IPv4 tail: "...:a.b.c.d"
        local head, v4 = s:match("^(.*:)([^:]*)$")
        local _, octets = parse_ipv4(v4 or "")
        if not octets then return nil end
        tail = { octets[1] * 256 + octets[2], octets[3] * 256 + octets[4] }
        s = head:find("::$") and head or head:sub(1, -2)
    end
    local want = 8 - #tail
    local a, b = s:find("::", 1, true)
    if a then
        if s:find("::", b, true) then return nil end  -- "::" twice, or ":::"
        local left, right = {}, {}
        if not hex_groups(s:sub(1, a - 1), left)
           or not hex_groups(s:sub(b + 1), right)
           or #left + #right >= want then
            return nil
        end
        groups = left
        for _ = 1, want - #left - #right do groups[#groups + 1] = 0 end
        for _, g in ipairs(right) do groups[#groups + 1] = g end
    elseif not hex_groups(s, groups) or #groups ~= want then
        return nil
    end
    for _, g in ipairs(tail) do groups[#groups + 1] = g end

    -- Longest run of zero groups (leftmost on ties), if at least two long.
    local best_at, best_len, run_at = nil, 1, nil
    for i = 1, 9 do
        if groups[i] == 0 then
            run_at = run_at or i
        elseif run_at then
            if i - run_at > best_len then best_at, best_len = run_at, i - run_at end
            run_at = nil
        end
    end
    local text = {}
    for i = 1, 8 do text[i] = format("%x", groups[i]) end
    if not best_at then return concat(text, ":") end
    return concat(text, ":", 1, best_at - 1) .. "::"
           .. concat(text, ":", best_at + best_len, 8)
end

-- Parses a "host:port" string. `listen` allows the wildcard hosts `*` and
-- 0.0.0.0 (and [::]); servers may not use them.
-- Returns { host, port, text, family } or nil, <what was expected>.
local function parse_address(s, listen)
    local expected = '"host:port"'
    if type(s) ~= "string" then return nil, expected end
    local host, port, bracketed = s:match("^%[([^%]]*)%]:(.*)$")
    if host then
        bracketed = true
    elseif s:find("^%[") then
        return nil, expected
    elseif s:find(":.*:") then
        return nil, expected .. ' with an IPv6 host in brackets, as "[::1]:80"'
    else
        host, port = s:match("^([^:]*):(.*)$")
        if not host then return nil, expected end
    end
    port = port:find("^%d+$") and tonumber(port)
    if not port or port < 1 or port > 65535 then
        return nil, expected .. " with a port from 1 to 65535"
    end

    local family, text
    if bracketed then
        host, family = parse_ipv6(host), "inet6"
    elseif host == "localhost" then
        host, family = "127.0.0.1", "inet"
    elseif host == "*" then
        host, family = "0.0.0.0", "inet"
    else
        host, family = parse_ipv4(host), "inet"
    end
    if not host and bracketed then
        return nil, expected .. " with a valid IPv6 address in the brackets"
    elseif not host then
        return nil, expected .. (listen
            and " with host an IPv4 address, [IPv6 address], localhost or *"
            or " with host an IPv4 address, [IPv6 address] or localhost")
    end
    if not listen and (host == "0.0.0.0" or host == "::") then
        return nil, expected .. " with a host to connect to (not *, 0.0.0.0 or [::])"
    end
    if family == "inet6" then
        text = format("[%s]:%d", host, port)
    else
        text = format("%s:%d", host, port)
    end
    return { host = host, port = port, text = text, family = family }
end

local function is_wildcard(addr) return addr.host == "0.0.0.0" or addr.host == "::" end

-- Records that `owner` listens on addr, or fails when something already
-- does: the same address, or the same port where either is the wildcard of
-- the family (the kernel would refuse the second bind at start-up).
-- (IPv6 listeners are IPv6-only, so the families do not overlap.)
local function claim_address(ctx, addr, owner, path, given)
    local other = ctx.addresses[addr.text]
    if other then
        fail(path, "expected a unique address, got %s (%s is also used by %s)",
             show(given), addr.text, other)
    end
    ctx.listening = ctx.listening or {}
    for _, o in ipairs(ctx.listening) do
        if o.addr.family == addr.family and o.addr.port == addr.port
           and (is_wildcard(o.addr) or is_wildcard(addr)) then
            fail(path, "expected an address that does not overlap another, got %s "
                 .. "(%s overlaps %s used by %s)", show(given), addr.text, o.addr.text, o.owner)
        end
    end
    ctx.addresses[addr.text] = owner
    ctx.listening[#ctx.listening + 1] = { addr = addr, owner = owner }
end

-- Returns the normalized address at `path`, or fails.
local function check_address(v, path, listen)
    local addr, expected = parse_address(v, listen)
    if not addr then fail(path, "expected %s, got %s", expected, show(v)) end
    return addr
end


---------------------------------------------------------------------------
-- Search path and stage modules
---------------------------------------------------------------------------

-- Returns the two package.path templates for folder `dir`, or nil, err when
-- the folder name cannot appear in a search path.
local function templates(dir, what)
    if type(dir) ~= "string" then return "" end
    if dir:find("[;?]") then
        return nil, format('config error: %s %s: a folder whose name contains ";" or "?" cannot be searched for modules',
                           what, quote(dir))
    end
    local d = dir:find("/$") and dir or dir .. "/"
    return d .. "?.lua;" .. d .. "?/init.lua;"
end

-- Returns the Lua package path used to find stage modules: the config's
-- folder, then <root>/lua, then <root>, then the current package.path.
-- Folders not given in opts are left out. Returns nil, err for a folder
-- whose name contains ";" or "?".
function _M.search_path(opts)
    opts = opts or {}
    local cfg, err = templates(opts.config_dir, "config_dir")
    if not cfg then return nil, err end
    local lib, root
    lib, err = templates(opts.root and opts.root:gsub("/$", "") .. "/lua", "root")
    if not lib then return nil, err end
    root, err = templates(opts.root, "root")
    if not root then return nil, err end
    return cfg .. lib .. root .. package.path
end

-- Returns true if name looks like `a.b.c` (each part [%w_]+).
local function valid_module_name(name)
    if type(name) ~= "string" then return false end
    local shape = name:gsub("[%w_]+", "x")
    return shape:find("^x[%.x]*$") ~= nil and not shape:find("..", 1, true)
           and not shape:find("%.$")
end

-- Loads a stage module the way the core will: compiled from `file`, run in a
-- sandbox with package.path set to the search path (so its own `require`s
-- resolve like at run time), called with its name. Returns true, its value,
-- or false, err. Restores package.path; modules it requires stay in
-- package.loaded (unloading them would re-run their ffi.cdef at run time).
local function run_module(name, file, search_path)
    local chunk, err = loadfile(file)
    if not chunk then return false, err end
    setfenv(chunk, sandbox())
    local saved = package.path
    package.path = search_path
    local ok, res = pcall(chunk, name)
    package.path = saved
    if not ok then
        return false, type(res) == "string" and res or "raised " .. show(res)
    end
    return true, res
end

-- Resolves and checks the stage module `name` for the entry at `path`.
-- Returns { kind = "c" } or { kind = "lua", file = ... }. Results are
-- cached per validation in ctx.modules so a module runs at most once.
local function resolve_stage(name, path, ctx)
    local cached = ctx.modules[name]
    if cached then return cached end
    local found
    if ctx.builtin[name] then
        found = { kind = "c" }
    else
        local file = searchpath(name, ctx.search_path)
        if not file then fail(path, "module %s not found", quote(name)) end
        local ok, mod = run_module(name, file, ctx.search_path)
        if not ok then
            fail(path, "module %s failed to load: %s", quote(name), mod)
        end
        if type(mod) ~= "table" then
            fail(path, "module %s expected to return a table of callbacks, got %s",
                 quote(name), show(mod))
        end
        local unknown = sorted_keys(mod, function(k, v)
            return type(v) == "function" and not CALLBACK_SET[k]
        end)
        if unknown[1] ~= nil then
            fail(path, "module %s has an unknown callback %s (known: %s)",
                 quote(name), show(unknown[1]), concat(CALLBACKS, ", "))
        end
        found = { kind = "lua", file = file, check = mod.check_options }
    end
    ctx.modules[name] = found
    return found
end

local STAGE_EXPECTED = 'a module name or a table { "module.name", option = value, ... }'

-- Options of the built-in C stages: for each, its keys in check order and a
-- check per key (value, path) that raises. The C stages parse them again
-- (src/pipeline/codec/*.c) and word their errors the same way.
local function opt_int(lo, hi, what, required)
    return function(v, path)
        if v == nil and not required then return end
        if type(v) ~= "number" or v ~= v or v < lo or v > hi or v ~= floor(v) then
            fail(path, "expected %s, got %s", what, show(v))
        end
    end
end

local function opt_bool(v, path)
    if v ~= nil and type(v) ~= "boolean" then
        fail(path, "expected true or false, got %s", show(v))
    end
end

local function opt_byte_order(v, path)
    if v ~= nil and v ~= "big" and v ~= "little" then
        fail(path, 'expected "big" or "little", got %s', show(v))
    end
end

local function opt_field_length(v, path)
    if v ~= nil and v ~= 1 and v ~= 2 and v ~= 3 and v ~= 4 and v ~= 8 then
        fail(path, "expected 1, 2, 3, 4 or 8, got %s", show(v))
    end
end

local function opt_delimiters(v, path)
    local ok = type(v) == "table" and #v > 0
    if ok then
        local n = 0
        for _, d in pairs(v) do
            n = n + 1
            ok = ok and type(d) == "string" and #d > 0
        end
        ok = ok and n == #v
    end
    if not ok then
        fail(path, "expected a non-empty list of non-empty strings, got %s", show(v))
    end
end

local POSITIVE = opt_int(1, MAX_INT, "a positive integer", true)
local COUNT = opt_int(0, MAX_INT, "an integer from 0 to 2147483647")
local ADJUSTMENT = opt_int(-MAX_INT - 1, MAX_INT, "an integer from -2147483648 to 2147483647")

local C_STAGE_OPTIONS = {
    ["sluice.codec.length_field"] = {
        { "max_frame_length", POSITIVE }, { "length_field_offset", COUNT },
        { "length_field_length", opt_field_length }, { "byte_order", opt_byte_order },
        { "length_adjustment", ADJUSTMENT }, { "initial_bytes_to_strip", COUNT },
        { "fail_fast", opt_bool },
        after = function(o, path)
            local max, len = o.max_frame_length, o.length_field_length or 4
            if (o.length_field_offset or 0) > max - len then
                fail(path .. ".length_field_offset",
                     "expected at most max_frame_length - length_field_length (%d), got %d",
                     max - len, o.length_field_offset)
            end
        end,
    },
    ["sluice.codec.line"] = {
        { "max_length", POSITIVE }, { "strip_delimiter", opt_bool }, { "fail_fast", opt_bool },
    },
    ["sluice.codec.delimiter"] = {
        { "delimiters", opt_delimiters }, { "max_frame_length", POSITIVE },
        { "strip_delimiter", opt_bool }, { "fail_fast", opt_bool },
    },
    ["sluice.codec.fixed_length"] = {
        { "frame_length", POSITIVE },
    },
    ["sluice.codec.length_field_prepender"] = {
        { "length_field_length", opt_field_length }, { "byte_order", opt_byte_order },
        { "length_adjustment", ADJUSTMENT },
    },
    -- None: an option such as a list of trusted balancers would be a
    -- restriction that is not there (any client may send a header).
    ["sluice.proxy_protocol"] = {},
}

-- Checks the options of C stage `name` (those without a schema take any).
local function check_c_options(name, options, path)
    local schema = C_STAGE_OPTIONS[name]
    if not schema then return end
    if schema[1] == nil then
        local given = sorted_keys(options, function() return true end)
        if given[1] ~= nil then
            fail(key_path(path, given[1]), "unknown key (%s takes no options)", quote(name))
        end
        return
    end
    local keys = {}
    for i, spec in ipairs(schema) do keys[i] = spec[1] end
    check_keys(options, path, keys)
    for _, spec in ipairs(schema) do
        spec[2](options[spec[1]], key_path(path, spec[1]))
    end
    if schema.after then schema.after(options, path) end
end

-- Options reach every worker's own Lua state by copy: plain data only.
local function check_plain(v, path, depth)
    local t = type(v)
    if t == "table" then
        if depth > 32 then fail(path, "expected plain data nested at most 32 deep") end
        for k, x in pairs(v) do
            if type(k) ~= "string" and type(k) ~= "number" then
                fail(path, "expected plain data (table keys are strings or numbers), got a %s key",
                     type(k))
            end
            check_plain(x, key_path(path, k), depth + 1)
        end
    elseif t ~= "string" and t ~= "number" and t ~= "boolean" then
        fail(path, "expected plain data (a string, number, boolean or table), got %s", show(v))
    end
end

-- Returns the normalized pipeline entry at `path`:
-- { module, kind, options, file (lua only) }. Options are a shallow copy.
local function check_stage(entry, path, ctx)
    local name, options = entry, {}
    if type(entry) == "table" then
        name = entry[1]
        local extra = sorted_keys(entry, function(k)
            return k ~= 1 and type(k) ~= "string"
        end)
        if extra[1] ~= nil then
            fail(key_path(path, extra[1]),
                 "unknown key (expected the module name at [1] and options under string keys)")
        end
        if not valid_module_name(name) then
            fail(path .. "[1]", 'expected a module name like "examples.stages.log_chunks", got %s',
                 show(name))
        end
        for k, v in pairs(entry) do
            if k ~= 1 then
                check_plain(v, key_path(path, k), 1)
                options[k] = v
            end
        end
    elseif type(entry) ~= "string" then
        fail(path, "expected %s, got %s", STAGE_EXPECTED, show(entry))
    elseif not valid_module_name(entry) then
        fail(path, 'expected a module name like "examples.stages.log_chunks", got %s',
             show(entry))
    end
    local found = resolve_stage(name, path, ctx)
    if found.kind == "c" then check_c_options(name, options, path) end
    -- A Lua stage may check its own options: check_options(options) returns
    -- nothing when they are fine, or the key at fault and what it expected.
    -- Returning the key alone says it is not an option of the stage (a
    -- third value may list the ones it takes).
    if found.check then
        local ok, key, expected, known = pcall(found.check, options)
        if not ok then
            fail(path, "module %s raised in check_options: %s", quote(name), one_line(tostring(key)))
        end
        if key ~= nil and expected == nil then
            fail(key_path(path, key), "unknown key (%s takes %s)", quote(name),
                 known and ("one of: " .. tostring(known)) or "no such option")
        elseif key ~= nil then
            fail(key_path(path, key), "expected %s, got %s", tostring(expected), show(options[key]))
        end
    end
    return { module = name, kind = found.kind, file = found.file, options = options }
end


---------------------------------------------------------------------------
-- Tables
---------------------------------------------------------------------------

local function check_log_level(v)
    if v == nil then return DEFAULT_LOG_LEVEL end
    if not LOG_LEVEL_SET[v] then
        fail("log_level", 'expected one of "%s", got %s',
             concat(LOG_LEVELS, '", "'), show(v))
    end
    return v
end

-- A log destination: "stderr", "off" (when allowed) or a file path, which
-- is opened for appending when sluice starts (not here).
local function check_log_target(v, path, may_be_off)
    local default = may_be_off and "off" or "stderr"
    if v == nil then return default end
    if type(v) ~= "string" or v == "" or v:find("[%z\n]")
       or (v == "off" and not may_be_off) then
        fail(path, 'expected %s or a file path, got %s',
             may_be_off and '"stderr", "off"' or '"stderr"', show(v))
    end
    return v
end

-- leak_detection = "simple" or { level = "simple", sample_rate = 128 }.
local function check_leak_detection(v)
    local level, rate = "simple", 128
    if type(v) == "table" then
        check_keys(v, "leak_detection", LEAK_KEYS)
        level = v.level == nil and level or v.level
        rate = check_positive_int(v.sample_rate, "leak_detection.sample_rate", 128)
        if type(level) ~= "string" or not set_of(LEAK_LEVELS)[level] then
            fail("leak_detection.level", 'expected one of "%s", got %s',
                 concat(LEAK_LEVELS, '", "'), show(level))
        end
    elseif v ~= nil then
        if type(v) ~= "string" or not set_of(LEAK_LEVELS)[v] then
            fail("leak_detection", 'expected one of "%s" or a table { level = ..., sample_rate = ... }, got %s',
                 concat(LEAK_LEVELS, '", "'), show(v))
        end
        level = v
    end
    return { level = level, sample_rate = rate }
end

-- Returns the normalized allocator section (every key filled in).
local function check_allocator(a)
    if a == nil then a = {} end
    if type(a) ~= "table" then
        fail("allocator", "expected a table, got %s", show(a))
    end
    check_keys(a, "allocator", ALLOCATOR_KEYS)
    local out = {}
    if a.type ~= nil and a.type ~= "pooled" and a.type ~= "unpooled" then
        fail("allocator.type", 'expected "pooled" or "unpooled", got %s', show(a.type))
    end
    out.type = a.type or "pooled"
    out.arenas = check_positive_int(a.arenas, "allocator.arenas", 0)
    if out.arenas > 256 then
        fail("allocator.arenas", "expected at most 256, got %s", show(a.arenas))
    end
    out.page_size = check_pow2(a.page_size, "allocator.page_size", 8192, 4096, 1048576)
    out.chunk_size = check_pow2(a.chunk_size, "allocator.chunk_size", 4194304,
                                65536, 33554432)
    if out.chunk_size < 16 * out.page_size then
        fail("allocator.chunk_size", "expected at least 16 pages (%d), got %s",
             16 * out.page_size, show(out.chunk_size))
    end
    out.small_cache = check_count(a.small_cache, "allocator.small_cache", 256, 65536)
    out.normal_cache = check_count(a.normal_cache, "allocator.normal_cache", 64, 65536)
    out.max_cached = check_count(a.max_cached, "allocator.max_cached", 32768, out.chunk_size)
    out.trim_interval = check_positive_int(a.trim_interval, "allocator.trim_interval", 8192)
    out.trim_idle_ms = check_positive_int(a.trim_idle_ms, "allocator.trim_idle_ms", 10000)
    out.max_memory = check_count(a.max_memory, "allocator.max_memory", 0, 2 ^ 53)
    if out.max_memory ~= 0 and out.max_memory < out.chunk_size then
        fail("allocator.max_memory", "expected 0 (no limit) or at least chunk_size (%d), got %s",
             out.chunk_size, show(a.max_memory))
    end
    return out
end

-- Is the normalized address on the loopback interface?
local function is_loopback(addr)
    if addr.family == "inet6" then return addr.host == "::1" end
    return addr.host:find("^127%.") ~= nil
end

-- admin = { listen = "127.0.0.1:9901", public = false }. Returns the
-- normalized table, or nil when absent (no admin endpoint).
local function check_admin(a, ctx)
    if a == nil then return nil end
    if type(a) ~= "table" then
        fail("admin", 'expected a table { listen = "127.0.0.1:9901" }, got %s', show(a))
    end
    check_keys(a, "admin", ADMIN_KEYS)
    if a.listen == nil then
        fail("admin.listen", 'expected "host:port" (the admin endpoint\'s address), got nil')
    end
    local listen = check_address(a.listen, "admin.listen", true)
    if a.public ~= nil and type(a.public) ~= "boolean" then
        fail("admin.public", "expected a boolean, got %s", show(a.public))
    end
    local public = a.public == true
    if not public and not is_loopback(listen) then
        fail("admin.listen", "expected a loopback address (127.0.0.1, [::1] or localhost) "
             .. "unless admin.public = true, got %s", show(a.listen))
    end
    claim_address(ctx, listen, "admin.listen", "admin.listen", a.listen)
    return { listen = listen, public = public }
end

local SERVER_EXPECTED = '"host:port" or { "host:port", weight = n }'

-- Returns the normalized server at `path`: an address with its weight.
local function check_server(v, path)
    local text, weight = v, 1
    if type(v) == "table" then
        local extra = sorted_keys(v, function(k) return k ~= 1 and k ~= "weight" end)
        if extra[1] ~= nil then
            fail(key_path(path, extra[1]),
                 'unknown key (expected the address at [1] and an optional weight)')
        end
        weight = v.weight
        if weight ~= nil and (type(weight) ~= "number" or weight ~= floor(weight)
                              or weight < 1 or weight > MAX_WEIGHT) then
            fail(path .. ".weight", "expected an integer from 1 to %d, got %s",
                 MAX_WEIGHT, show(weight))
        end
        text, path, weight = v[1], path .. "[1]", weight or 1
    elseif type(v) ~= "string" then
        fail(path, "expected %s, got %s", SERVER_EXPECTED, show(v))
    end
    local addr = check_address(text, path, false)
    addr.weight = weight
    return addr
end

-- health_check = { interval_ms, timeout_ms, fails, passes, send, expect }: all optional.
local function check_health(h, path)
    if h == nil then return nil end
    if type(h) ~= "table" then
        fail(path, "expected a table { interval_ms = n, timeout_ms = n, fails = n, passes = n }, got %s",
             show(h))
    end
    check_keys(h, path, HEALTH_KEYS)
    local interval = check_positive_int(h.interval_ms, path .. ".interval_ms",
                                        HEALTH_DEFAULTS.interval_ms)
    local timeout = check_positive_int(h.timeout_ms, path .. ".timeout_ms", nil)
    if timeout == nil then
        timeout = HEALTH_DEFAULTS.timeout_ms < interval and HEALTH_DEFAULTS.timeout_ms or interval
    elseif timeout > interval then
        fail(path .. ".timeout_ms", "expected at most interval_ms (%d), got %s", interval,
             show(timeout))
    end
    local fails = check_positive_int(h.fails, path .. ".fails", HEALTH_DEFAULTS.fails)
    local passes = check_positive_int(h.passes, path .. ".passes", HEALTH_DEFAULTS.passes)
    -- send: bytes written once connected; expect: bytes the answer must
    -- contain (within its first 4096 bytes).
    local function bytes(key, max)
        local v = h[key]
        if v ~= nil and (type(v) ~= "string" or #v == 0 or #v > max) then
            fail(path .. "." .. key, "expected a string of 1 to %d bytes, got %s", max, show(v))
        end
        return v
    end
    return {
        interval_ms = interval,
        timeout_ms = timeout,
        fails = fails,
        passes = passes,
        send = bytes("send", 1024),
        expect = bytes("expect", 256),
    }
end

-- send_proxy = "v1" or "v2": the PROXY protocol header sent first on each
-- connection to the upstream's servers. Returns 1, 2 or nil.
local function check_send_proxy(v, path)
    if v == nil then return nil end
    if v == "v1" then return 1 elseif v == "v2" then return 2 end
    fail(path, 'expected "v1" or "v2", got %s', show(v))
end

-- Returns the normalized upstream `name`.
local function check_upstream(name, up, path)
    if type(up) ~= "table" then
        fail(path, "expected a table { servers = { \"host:port\", ... } }, got %s", show(up))
    end
    check_keys(up, path, UPSTREAM_KEYS)
    local spath = path .. ".servers"
    local servers = up.servers
    if type(servers) ~= "table" or next(servers) == nil then
        fail(spath, 'expected a non-empty array of "host:port" strings, got %s', show(servers))
    end
    local out = {}
    for i = 1, check_array(servers, spath) do
        out[i] = check_server(servers[i], format("%s[%d]", spath, i))
    end
    local balance = up.balance
    if balance == nil then
        balance = "round_robin"
    elseif not set_of(BALANCES)[balance] then
        fail(path .. ".balance", 'expected one of "%s", got %s', concat(BALANCES, '", "'),
             show(balance))
    end
    local connect_timeout = check_positive_int(up.connect_timeout_ms,
        path .. ".connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS)
    local tries = up.tries
    if tries == nil then
        tries = #out
    elseif type(tries) ~= "number" or tries ~= floor(tries) or tries < 1 or tries > #out then
        fail(path .. ".tries", "expected an integer from 1 to %d (the number of servers), got %s",
             #out, show(tries))
    end
    return {
        name = name,
        servers = out,
        balance = balance,
        connect_timeout_ms = connect_timeout,
        tries = tries,
        max_fails = check_count(up.max_fails, path .. ".max_fails", DEFAULT_MAX_FAILS, MAX_INT),
        fail_timeout_ms = check_positive_int(up.fail_timeout_ms, path .. ".fail_timeout_ms",
                                             DEFAULT_FAIL_TIMEOUT_MS),
        health_check = check_health(up.health_check, path .. ".health_check"),
        send_proxy = check_send_proxy(up.send_proxy, path .. ".send_proxy"),
    }
end

-- Returns the normalized upstreams table and the sorted list of their names.
local function check_upstreams(ups)
    if ups == nil then return {}, {} end
    if type(ups) ~= "table" then
        fail("upstreams", "expected a table of upstreams keyed by name, got %s", show(ups))
    end
    local out, names = {}, sorted_keys(ups)
    for _, name in ipairs(names) do
        local path = key_path("upstreams", name)
        if type(name) ~= "string" or not name:find("^[%w_%-%.]+$") then
            fail(path, 'expected an upstream name made of letters, digits, "_", "-" and ".", got %s',
                 show(name))
        end
        out[name] = check_upstream(name, ups[name], path)
    end
    return out, names
end

-- Returns the normalized listener at `path`. ctx.names and
-- ctx.addresses map names and listen texts to the path that used them first.
-- tcp_keepalive: false (off), true (on, the system's settings) or a table of
-- idle_ms, interval_ms and count (each optional). Normalized to false or
-- { idle_ms, interval_ms, count } with 0 for "the system's".
local function check_keepalive(v, path)
    if v == nil or v == false then return false end
    if v == true then return { idle_ms = 0, interval_ms = 0, count = 0 } end
    if type(v) ~= "table" then
        fail(path, "expected a boolean or a table { idle_ms, interval_ms, count }, got %s", show(v))
    end
    check_keys(v, path, KEEPALIVE_KEYS)
    local out = {}
    for _, k in ipairs({ "idle_ms", "interval_ms" }) do
        out[k] = check_positive_int(v[k], path .. "." .. k, 0)
        if out[k] > MAX_KEEPALIVE_MS then
            fail(path .. "." .. k, "expected at most %d, got %s", MAX_KEEPALIVE_MS, show(v[k]))
        end
    end
    out.count = check_positive_int(v.count, path .. ".count", 0)
    if out.count > MAX_KEEPALIVE_COUNT then
        fail(path .. ".count", "expected at most %d, got %s", MAX_KEEPALIVE_COUNT, show(v.count))
    end
    return out
end

local function check_listener(l, path, ctx)
    if type(l) ~= "table" then
        fail(path, "expected a listener table, got %s", show(l))
    end
    check_keys(l, path, LISTENER_KEYS)

    local name = l.name
    if type(name) ~= "string" or name == "" then
        fail(path .. ".name", "expected a non-empty string, got %s", show(name))
    end
    -- The name goes unquoted into log lines, the access log's logfmt and
    -- metric labels: a space, a quote or a newline would break them.
    if not name:find("^[%w_%-%.]+$") then
        fail(path .. ".name", 'expected a name made of letters, digits, "_", "-" and ".", got %s',
             show(name))
    end
    if ctx.names[name] then
        fail(path .. ".name", "expected a unique name, got %s (also %s)",
             show(name), ctx.names[name])
    end
    ctx.names[name] = path

    local listen = check_address(l.listen, path .. ".listen", true)
    claim_address(ctx, listen, path, path .. ".listen", l.listen)

    local upstream = l.upstream
    if upstream ~= nil and (type(upstream) ~= "string" or not ctx.upstreams[upstream]) then
        fail(path .. ".upstream", "expected the name of an upstream (%s), got %s",
             #ctx.upstream_names == 0 and "no upstreams are defined"
             or "one of: " .. concat(ctx.upstream_names, ", "),
             show(upstream))
    end

    local pipeline = {}
    local ppath = path .. ".pipeline"
    if l.pipeline ~= nil then
        if type(l.pipeline) ~= "table" then
            fail(ppath, "expected an array of stages, got %s", show(l.pipeline))
        end
        for i = 1, check_array(l.pipeline, ppath) do
            pipeline[i] = check_stage(l.pipeline[i], format("%s[%d]", ppath, i), ctx)
            -- The PROXY protocol header is the first thing on the wire.
            if pipeline[i].module == "sluice.proxy_protocol" and i ~= 1 then
                fail(format("%s[%d]", ppath, i), 'expected "sluice.proxy_protocol" only as the first '
                     .. "stage (the header comes before any other byte), got it at %d", i)
            end
        end
    end

    local low = check_positive_int(l.low_water_mark, path .. ".low_water_mark", nil)
    local high = check_positive_int(l.high_water_mark, path .. ".high_water_mark",
                                    DEFAULT_HIGH_WATER_MARK)
    local limit = check_positive_int(l.outbound_limit, path .. ".outbound_limit",
                                     DEFAULT_OUTBOUND_LIMIT)
    local spin = check_positive_int(l.write_spin_count, path .. ".write_spin_count",
                                    DEFAULT_WRITE_SPIN_COUNT)
    local gather = check_positive_int(l.max_bytes_per_gathering_write,
                                      path .. ".max_bytes_per_gathering_write", nil)
    if low == nil then
        -- The default low mark never exceeds an explicit, smaller high one.
        low = DEFAULT_LOW_WATER_MARK < high and DEFAULT_LOW_WATER_MARK or high
    elseif low > high then
        fail(path .. ".low_water_mark", "expected at most high_water_mark (%d), got %s",
             high, show(low))
    end
    if limit < high then
        fail(path .. ".outbound_limit", "expected at least high_water_mark (%d), got %s",
             high, show(limit))
    end

    local max_connections = check_positive_int(l.max_connections,
                                               path .. ".max_connections", 0)
    local idle_timeout_ms = check_positive_int(l.idle_timeout_ms,
                                               path .. ".idle_timeout_ms", 0)
    local connect_timeout_ms = check_positive_int(l.connect_timeout_ms,
                                                  path .. ".connect_timeout_ms", 0)
    if l.defer_accept ~= nil and type(l.defer_accept) ~= "boolean" then
        fail(path .. ".defer_accept", "expected a boolean, got %s", show(l.defer_accept))
    end
    if l.splice ~= nil and type(l.splice) ~= "boolean" and l.splice ~= "auto" then
        fail(path .. ".splice", 'expected a boolean or "auto", got %s', show(l.splice))
    end
    local half_close_timeout_ms = check_positive_int(l.half_close_timeout_ms,
                                                     path .. ".half_close_timeout_ms", 0)
    local keepalive = check_keepalive(l.tcp_keepalive, path .. ".tcp_keepalive")

    if upstream == nil and #pipeline == 0 then
        fail(path, "expected an upstream or a pipeline")
    end

    return {
        name = name,
        listen = listen,
        upstream = upstream,
        pipeline = pipeline,
        low_water_mark = low,
        high_water_mark = high,
        outbound_limit = limit,
        write_spin_count = spin,
        max_bytes_per_gathering_write = gather,
        max_connections = max_connections,
        idle_timeout_ms = idle_timeout_ms,
        connect_timeout_ms = connect_timeout_ms,
        defer_accept = l.defer_accept == true,
        splice = l.splice == nil and "auto" or l.splice,
        half_close_timeout_ms = half_close_timeout_ms,
        tcp_keepalive = keepalive,
    }
end

local function check_listeners(ls, ctx)
    if type(ls) ~= "table" or next(ls) == nil then
        fail("listeners", "expected a non-empty array of listener tables, got %s", show(ls))
    end
    local out = {}
    for i = 1, check_array(ls, "listeners") do
        out[i] = check_listener(ls[i], format("listeners[%d]", i), ctx)
    end
    return out
end

local function check_root(t, ctx)
    if type(t) ~= "table" then
        fail("", "expected a table, got %s", show(t))
    end
    -- A stage module given where a configuration belongs: say so.
    for _, name in ipairs(CALLBACKS) do
        if type(t[name]) == "function" then
            fail("", "expected a configuration table, got a stage module (it defines %s); "
                 .. "name the module in a listener's pipeline instead", name)
        end
    end
    check_keys(t, "", TOP_KEYS)
    local log_level = check_log_level(t.log_level)
    local allocator = check_allocator(t.allocator)
    local leak_detection = check_leak_detection(t.leak_detection)
    local workers = check_positive_int(t.workers, "workers", 0)
    if workers > MAX_WORKERS then
        fail("workers", "expected at most %d, got %s", MAX_WORKERS, show(t.workers))
    end
    local drain = check_count(t.drain_timeout_ms, "drain_timeout_ms",
                              DEFAULT_DRAIN_TIMEOUT_MS, MAX_INT)
    local error_log = check_log_target(t.error_log, "error_log", false)
    local access_log = check_log_target(t.access_log, "access_log", true)
    local admin = check_admin(t.admin, ctx)
    local max_pipes = check_count(t.max_pipes, "max_pipes", nil, MAX_INT)
    local lua_memory_limit = check_count(t.lua_memory_limit, "lua_memory_limit", 0, 2 ^ 53)
    if lua_memory_limit ~= 0 and lua_memory_limit < MIN_LUA_MEMORY then
        fail("lua_memory_limit", "expected 0 (no limit) or at least %d (1 MiB), got %s",
             MIN_LUA_MEMORY, show(t.lua_memory_limit))
    end
    local lua_timeout_ms = check_count(t.lua_timeout_ms, "lua_timeout_ms",
                                       DEFAULT_LUA_TIMEOUT_MS, MAX_INT)
    local upstreams, names = check_upstreams(t.upstreams)
    ctx.upstreams, ctx.upstream_names = upstreams, names
    return {
        log_level = log_level,
        allocator = allocator,
        leak_detection = leak_detection,
        workers = workers,
        drain_timeout_ms = drain,
        error_log = error_log,
        access_log = access_log,
        admin = admin,
        max_pipes = max_pipes,
        lua_memory_limit = lua_memory_limit,
        lua_timeout_ms = lua_timeout_ms,
        search_path = ctx.search_path,
        listeners = check_listeners(t.listeners, ctx),
        upstreams = upstreams,
        upstream_names = names,
    }
end


---------------------------------------------------------------------------
-- Entry points
---------------------------------------------------------------------------

-- Raises on opts of the wrong shape; returns opts or an empty table.
local function check_opts(opts, level)
    if opts == nil then return {} end
    if type(opts) ~= "table" then
        error("bad 'opts' argument (table expected)", level + 1)
    end
    for _, k in ipairs({ "root", "config_dir" }) do
        if opts[k] ~= nil and type(opts[k]) ~= "string" then
            error(format("bad 'opts.%s' argument (string expected)", k), level + 1)
        end
    end
    if opts.builtin ~= nil and type(opts.builtin) ~= "table" then
        error("bad 'opts.builtin' argument (table expected)", level + 1)
    end
    local limit = opts.instruction_limit
    if limit ~= nil and (type(limit) ~= "number" or limit < 1 or limit % 1 ~= 0) then
        error("bad 'opts.instruction_limit' argument (positive integer expected)", level + 1)
    end
    return opts
end

local THIS_SOURCE = getinfo(1, "S").source
local bounded_depth = 0  -- > 0 while a bounded call runs (validate inside load)

-- Calls fn(...) under the instruction limit (see the top of this file).
-- Returns what fn returns, or nil, "config error: <where>: still running
-- ..." when the limit was reached. The hook fires every HOOK_STEP
-- instructions and counts a step only when it finds code outside this file
-- running: the validation itself, however large the configuration, is not
-- user code and is never stopped. Past the limit the hook fires at every
-- instruction while user code runs and raises each time, so a pcall in user
-- code cannot swallow it; back in this file it steps again. Other errors
-- pass through.
local function bounded(where, limit, fn, ...)
    if bounded_depth > 0 then return fn(...) end
    local msg = format("still running after %d Lua instructions (a loop that never ends?)",
                       limit)
    local steps, max_steps, over, each = 0, ceil(limit / HOOK_STEP), false, false
    local function hook()
        if getinfo(2, "S").source == THIS_SOURCE then
            if each then
                each = false
                sethook(hook, "", HOOK_STEP)
            end
            return
        end
        if not over then
            steps = steps + 1
            if steps < max_steps then return end
            over = true
        end
        if not each then
            each = true
            sethook(hook, "", 1)
        end
        error(msg, 0)
    end
    local old_hook, old_mask, old_count = gethook()
    local jit_on = jit.status()
    jit.off()
    bounded_depth = bounded_depth + 1
    sethook(hook, "", HOOK_STEP)
    local res = { pcall(fn, ...) }
    sethook(old_hook, old_mask, old_count)
    bounded_depth = bounded_depth - 1
    if jit_on then jit.on() end
    if res[1] then return unpack(res, 2, maxn(res)) end
    if res[2] == msg then return nil, format("config error: %s: %s", where, msg) end
    error(res[2], 0)
end

-- Validates an evaluated configuration table. Borrows tbl and never modifies
-- it. Returns a new normalized table, or nil, "config error: ..." (one line).
-- Loads (and runs) every Lua stage module named by a pipeline.
local function validate(tbl, opts)
    local search_path, err = _M.search_path(opts)
    if not search_path then return nil, err end
    local ctx = {
        search_path = search_path,
        builtin = opts.builtin or {},
        modules = {},     -- module name -> { kind, file }
        names = {},       -- listener name -> path of the listener using it
        addresses = {},   -- listen text -> path of the listener using it
    }
    local ok, res = pcall(check_root, tbl, ctx)
    if ok then return res end
    if getmetatable(res) == Failure then return nil, res.msg end
    error(res, 0)  -- a bug in this module, not in the configuration
end

-- Returns "config error: <path>: <msg>" for an error loading or running the
-- file. Lua's messages already start with "<path>:<line>:"; those are kept
-- as is rather than naming the path twice.
-- validate() above, under the instruction limit (see the top of this file).
function _M.validate(tbl, opts)
    opts = check_opts(opts, 2)
    return bounded("top level", opts.instruction_limit or DEFAULT_INSTRUCTION_LIMIT,
                   validate, tbl, opts)
end

local function file_error(path, err)
    if type(err) ~= "string" then
        err = "raised " .. show(err)
    end
    for _, verb in ipairs({ "open", "read" }) do
        local prefix = "cannot " .. verb .. " " .. path .. ": "
        if err:sub(1, #prefix) == prefix then
            err = format("cannot %s file (%s)", verb, err:sub(#prefix + 1))
        end
    end
    if err:sub(1, #path + 1) == path .. ":" then
        return one_line("config error: " .. err)
    end
    return one_line(format("config error: %s: %s", path, err))
end

-- Returns the folder of path ("." when it has none).
local function dirname(path)
    local dir = path:match("^(.*)/[^/]*$")
    if dir == nil then return "." end
    return dir == "" and "/" or dir
end

-- Loads the configuration file at `path`, runs it in a sandbox (globals are
-- readable, assignments stay in the sandbox) and validates what it returns.
-- opts.config_dir defaults to the folder of path. Returns the normalized
-- table, or nil, "config error: ..." (one line).
function _M.load(path, opts)
    if type(path) ~= "string" then
        error("bad 'path' argument (string expected)", 2)
    end
    opts = check_opts(opts, 2)
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    if o.config_dir == nil then o.config_dir = dirname(path) end

    return bounded(path, o.instruction_limit or DEFAULT_INSTRUCTION_LIMIT, function()
        local chunk, err = loadfile(path)
        if not chunk then return nil, file_error(path, err) end
        setfenv(chunk, sandbox())
        local ok, res = pcall(chunk)
        if not ok then return nil, file_error(path, res) end
        if type(res) ~= "table" then
            return nil, "config error: top level: expected the file to return a table, got "
                        .. show(res)
        end
        return validate(res, o)
    end)
end

return _M
