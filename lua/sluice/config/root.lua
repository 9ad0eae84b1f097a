-- sluice.config.root: the top level of a configuration, its keys that are
-- single numbers, and the order in which the parts are checked.
--
--   listeners   required: sluice.config.listeners
--   upstreams   optional: sluice.config.upstreams
--   log_level   optional: sluice.config.logging
--   allocator, leak_detection  optional: sluice.config.allocator
--   workers     optional integer 1-256, default 0 (one per core)
--   drain_timeout_ms optional integer 0-2^31-1: how long a stop waits for
--               open connections, default 10000
--   error_log, access_log, access_log_format  optional: sluice.config.logging
--   admin       optional: sluice.config.admin
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
--   resolve_cache_ms optional integer 0-2^31-1: how long the addresses of a
--               host name given to ctx:connect are used before it is
--               resolved again, default 30000; 0: every connect resolves
--               (with a resolver: the answer's TTL when that is shorter)
--   resolver    optional: sluice.config.resolver (DNS servers, TTLs)
--
-- Check order (so the first error reported is deterministic): a stage
-- module given where the configuration belongs, unknown keys of the top
-- level, then log_level, allocator, leak_detection, workers,
-- drain_timeout_ms, error_log, access_log, access_log_format, admin, max_pipes,
-- lua_memory_limit, lua_timeout_ms, resolve_cache_ms, resolver, upstreams (by sorted
-- name), listeners (in array order).
--
-- Normalized: { log_level, allocator, leak_detection, workers,
-- drain_timeout_ms, error_log, access_log, access_log_format, admin (or nil), max_pipes (or
-- nil: from the open-files limit), lua_memory_limit (0: none),
-- lua_timeout_ms (0: none), resolve_cache_ms, resolver (or nil), search_path,
-- listeners, upstreams, upstream_names = { sorted names } }.

local _M = {}

local type = type
local ipairs = ipairs

local check = require("sluice.config.check")
local logging = require("sluice.config.logging")
local allocator = require("sluice.config.allocator")
local check_log_level, check_log_target = logging.check_level, logging.check_target
local check_allocator, check_leak_detection = allocator.check, allocator.check_leak_detection
local check_admin = require("sluice.config.admin").check
local check_resolver = require("sluice.config.resolver").check
local check_upstreams = require("sluice.config.upstreams").check
local check_listeners = require("sluice.config.listeners").check
local CALLBACKS = require("sluice.config.stages").CALLBACKS
local fail, show, check_keys = check.fail, check.show, check.check_keys
local check_positive_int, check_count = check.check_positive_int, check.check_count
local MAX_INT = check.MAX_INT

require("sluice.config.sandbox").exempt()

local DEFAULT_DRAIN_TIMEOUT_MS = 10000
local MAX_WORKERS = 256
local MIN_LUA_MEMORY = 1048576
local DEFAULT_LUA_TIMEOUT_MS = 5000
local DEFAULT_RESOLVE_CACHE_MS = 30000

-- Known keys of the top level, in check order (also the order shown in errors).
local TOP_KEYS = { "listeners", "upstreams", "log_level", "allocator", "leak_detection",
                   "workers", "drain_timeout_ms", "error_log", "access_log",
                   "access_log_format", "admin",
                   "max_pipes", "lua_memory_limit", "lua_timeout_ms", "resolve_cache_ms",
                   "resolver" }

-- Returns the normalized configuration for table t. ctx holds the search
-- path, the built-in stages and what the checks record as they go (see
-- sluice.config's validate).
function _M.check(t, ctx)
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
    local access_log_format = logging.check_access_format(t.access_log_format)
    local admin = check_admin(t.admin, ctx)
    local max_pipes = check_count(t.max_pipes, "max_pipes", nil, MAX_INT)
    local lua_memory_limit = check_count(t.lua_memory_limit, "lua_memory_limit", 0, 2 ^ 53)
    if lua_memory_limit ~= 0 and lua_memory_limit < MIN_LUA_MEMORY then
        fail("lua_memory_limit", "expected 0 (no limit) or at least %d (1 MiB), got %s",
             MIN_LUA_MEMORY, show(t.lua_memory_limit))
    end
    local lua_timeout_ms = check_count(t.lua_timeout_ms, "lua_timeout_ms",
                                       DEFAULT_LUA_TIMEOUT_MS, MAX_INT)
    local resolve_cache_ms = check_count(t.resolve_cache_ms, "resolve_cache_ms",
                                         DEFAULT_RESOLVE_CACHE_MS, MAX_INT)
    local resolver = check_resolver(t.resolver)
    -- Host names are looked up on the resolver's servers when it names
    -- some: opts.resolve takes it as its second argument.
    local resolve = ctx.resolve
    if resolve ~= nil and resolver ~= nil then
        local given = resolve
        resolve = function(name) return given(name, resolver) end
    end
    local upstreams, names = check_upstreams(t.upstreams, resolve, ctx.config_dir)
    ctx.upstreams, ctx.upstream_names = upstreams, names
    return {
        log_level = log_level,
        allocator = allocator,
        leak_detection = leak_detection,
        workers = workers,
        drain_timeout_ms = drain,
        error_log = error_log,
        access_log = access_log,
        access_log_format = access_log_format,
        admin = admin,
        max_pipes = max_pipes,
        lua_memory_limit = lua_memory_limit,
        lua_timeout_ms = lua_timeout_ms,
        resolve_cache_ms = resolve_cache_ms,
        resolver = resolver,
        search_path = ctx.search_path,
        listeners = check_listeners(t.listeners, ctx),
        upstreams = upstreams,
        upstream_names = names,
    }
end

return _M
