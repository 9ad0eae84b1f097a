-- sluice.config: load, validate and normalize a sluice configuration file.
--
-- The configuration is a Lua file that returns a table. `load` runs it in an
-- environment of its own, `validate` checks the table against the schema
-- and returns a new, normalized table that the C core reads with the classic
-- Lua C API (src/proxy/config.c). Pure Lua 5.1 / LuaJIT: no FFI, no C
-- modules.
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
--                   optional (default 100 million; see sluice.config.sandbox)
--   opts.resolve    function(name, resolver) -> array of { host, family =
--                   "inet" or "inet6" }, or nil, why: the addresses of a
--                   host name given as an upstream server, looked up on the
--                   servers of `resolver` (the normalized `resolver` table,
--                   nil when the configuration has none: the system's
--                   resolver; src/proxy/config.c); optional, without it
--                   host names are refused
--
-- Errors. On failure `load` and `validate` return nil and exactly one line:
--
--   config error: <key path>: expected <what>, got <value>
--
-- (sluice.config.check has the details). Errors in the file itself are
-- `config error: <path>: <msg>`.
--
-- The schema, one module per part, each documenting its keys, defaults,
-- check order and normalized form (unknown keys are errors at every level):
--
--   sluice.config.root        the top level, its single-number keys and the
--                             order in which the parts are checked
--   sluice.config.listeners   listeners
--   sluice.config.tls         a listener's tls
--   sluice.config.stages      a listener's pipeline, and the search path
--   sluice.config.c_stage_options  options of the built-in C stages
--   sluice.config.upstreams   upstreams
--   sluice.config.address     "host:port" addresses
--   sluice.config.admin       admin
--   sluice.config.allocator   allocator, leak_detection
--   sluice.config.logging     log_level, error_log, access_log
--   sluice.config.check       the error format and the checks of plain values
--   sluice.config.sandbox     where user code runs: environment, instruction limit
--
-- The result is a new table; the input is never modified. docs/configuration.md
-- is the user's reference.
--
-- Bad arguments (opts of the wrong type) are programming errors and raise.

local _M = {}

local type = type
local tostring = tostring
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local xpcall = xpcall
local error = error
local setmetatable = setmetatable
local getmetatable = getmetatable
local getinfo = debug.getinfo
local loadfile = loadfile
local setfenv = setfenv
local format = string.format

local check = require("sluice.config.check")
local sandbox = require("sluice.config.sandbox")
local stages = require("sluice.config.stages")
local check_root = require("sluice.config.root").check
local upstreams = require("sluice.config.upstreams")
local show, one_line = check.show, check.one_line
local bounded, DEFAULT_INSTRUCTION_LIMIT = sandbox.bounded, sandbox.DEFAULT_INSTRUCTION_LIMIT
local is_own = sandbox.is_own

sandbox.exempt()

-- Returns the Lua package path used to find stage modules: the config's
-- folder, then <root>/lua, then <root>, then the current package.path.
-- Folders not given in opts are left out. Returns nil, err for a folder
-- whose name contains ";" or "?".
_M.search_path = stages.search_path

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
    if opts.resolve ~= nil and type(opts.resolve) ~= "function" then
        error("bad 'opts.resolve' argument (function expected)", level + 1)
    end
    local limit = opts.instruction_limit
    if limit ~= nil and (type(limit) ~= "number" or limit < 1 or limit % 1 ~= 0) then
        error("bad 'opts.instruction_limit' argument (positive integer expected)", level + 1)
    end
    return opts
end

local UserError = {}  -- metatable of the errors user code raised during a validation

-- The message handler of a validation. An error raised where user code runs
-- (a metamethod of the configuration's tables, a resolver given in opts:
-- the innermost Lua function is outside sluice.config's own files) becomes
-- a UserError { err, by }, `by` naming the function sluice.config called
-- into. Failures, and errors of sluice.config's own code (its bugs, the
-- instruction limit's hook), are left as they are.
local function on_error(err)
    if check.is_failure(err) then return err end
    local level = 2  -- 1: this handler; 2: error() or the function that failed
    local info = getinfo(level, "S")
    while info and info.what == "C" do
        level = level + 1
        info = getinfo(level, "S")
    end
    if not info or is_own(info.source) then return err end
    local entry
    repeat
        entry = getinfo(level, "n")
        level = level + 1
        info = getinfo(level, "S")
    until not info or is_own(info.source)
    local by = "code outside sluice.config"
    if entry.namewhat == "metamethod" then
        by = "the " .. tostring(entry.name) .. " metamethod of a configuration table"
    end
    return setmetatable({ err = err, by = by }, UserError)
end

-- Validates an evaluated configuration table. Borrows tbl and never modifies
-- it. Returns a new normalized table, or nil, "config error: ..." (one line).
-- Loads (and runs) every Lua stage module named by a pipeline. An error that
-- user code raises meanwhile is reported at `where` (the file, or "top
-- level"); an error of sluice.config itself is raised.
local function validate(tbl, opts, where)
    local search_path, err = _M.search_path(opts)
    if not search_path then return nil, err end
    local ctx = {
        search_path = search_path,
        builtin = opts.builtin or {},
        resolve = opts.resolve,
        config_dir = opts.config_dir,   -- relative tls files start there
        modules = {},     -- module name -> { kind, file }
        names = {},       -- listener name -> path of the listener using it
        addresses = {},   -- listen text -> path of the listener using it
    }
    local ok, res = xpcall(function() return check_root(tbl, ctx) end, on_error)
    if ok then return res end
    if check.is_failure(res) then return nil, res.msg end
    if getmetatable(res) == UserError then
        local msg = type(res.err) == "string" and res.err or "raised " .. show(res.err)
        return nil, where(format("%s (raised by %s during validation)",
                                 msg, res.by))
    end
    error(res, 0)  -- a bug in sluice.config, not in the configuration
end

local function at_top_level(msg)
    return one_line("config error: top level: " .. msg)
end

-- validate() above, under the instruction limit (sluice.config.sandbox).
function _M.validate(tbl, opts)
    opts = check_opts(opts, 2)
    return bounded("top level", opts.instruction_limit or DEFAULT_INSTRUCTION_LIMIT,
                   validate, tbl, opts, at_top_level)
end

-- Returns "config error: <path>: <msg>" for an error loading or running the
-- file. Lua's messages already start with "<path>:<line>:"; those are kept
-- as is rather than naming the path twice.
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
        setfenv(chunk, sandbox.env())
        local ok, res = pcall(chunk)
        if not ok then return nil, file_error(path, res) end
        if type(res) ~= "table" then
            return nil, "config error: top level: expected the file to return a table, got "
                        .. show(res)
        end
        return validate(res, o, function(msg) return file_error(path, msg) end)
    end)
end

-- The upstreams of cfg (a table load or validate returned) with their host
-- names resolved again by resolve (opts.resolve's shape): a new upstreams
-- table for cfg.upstream_names, or nil, "config error: ..." (one line) when
-- a name no longer resolves. User code does not run: cfg is sluice's own.
function _M.reexpand(cfg, resolve)
    local ok, res = pcall(upstreams.reexpand, cfg.upstreams, cfg.upstream_names, resolve)
    if ok then return res end
    if check.is_failure(res) then return nil, one_line(res.msg) end
    error(res, 0)
end

return _M
