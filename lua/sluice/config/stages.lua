-- sluice.config.stages: the stages of a listener's pipeline, and the search
-- path their modules are found on.
--
--   pipeline   optional array of stages: "module.name" or
--              { "module.name", option = value, ... }
--
-- A module name is `a.b.c` (each part letters, digits and "_"). A name in
-- opts.builtin is a C stage (its options: sluice.config.c_stage_options);
-- any other is a Lua module found on the search path, run once per
-- validation in a sandbox, which must return a table whose functions are
-- known callbacks (CALLBACKS). Stage options (string keys of an entry) are
-- plain data: strings, numbers, booleans and tables of them. A Lua stage may
-- check its own options with check_options. A stage is resolved (and its
-- module run) when its entry is checked.
--
-- Normalized entry: { module, kind = "lua", file, options } or
-- { module, kind = "c", options }.

local _M = {}

local type = type
local pairs = pairs
local pcall = pcall
local tostring = tostring
local loadfile = loadfile
local setfenv = setfenv
local format = string.format
local concat = table.concat
local package = package  -- package.path is read at call time, never cached
local searchpath = package.searchpath

local check = require("sluice.config.check")
local c_stage_options = require("sluice.config.c_stage_options")
local sandbox = require("sluice.config.sandbox")
local fail, show, quote, key_path = check.fail, check.show, check.quote, check.key_path
local sorted_keys, one_line, check_array = check.sorted_keys, check.one_line, check.check_array

sandbox.exempt()

-- Callback names a Lua stage module may define (function-valued fields):
-- the events, and added/removed (the stage joined or left a pipeline, as
-- sluice.codec.decoder defines them).
_M.CALLBACKS = { "channel_active", "channel_inactive", "channel_read",
                 "channel_read_complete", "channel_writability_changed",
                 "user_event", "error", "write", "flush", "close", "read", "added", "removed",
                 "check_options" }
local CALLBACKS = _M.CALLBACKS
local CALLBACK_SET = check.set_of(CALLBACKS)

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
    setfenv(chunk, sandbox.env())
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
    if found.kind == "c" then c_stage_options.check(name, options, path) end
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

-- Returns the normalized pipeline `v` of the listener at `path` (an empty
-- array when v is nil).
function _M.check_pipeline(v, path, ctx)
    local pipeline = {}
    local ppath = path .. ".pipeline"
    if v ~= nil then
        if type(v) ~= "table" then
            fail(ppath, "expected an array of stages, got %s", show(v))
        end
        for i = 1, check_array(v, ppath) do
            pipeline[i] = check_stage(v[i], format("%s[%d]", ppath, i), ctx)
            -- The PROXY protocol header is the first thing on the wire.
            if pipeline[i].module == "sluice.proxy_protocol" and i ~= 1 then
                fail(format("%s[%d]", ppath, i), 'expected "sluice.proxy_protocol" only as the first '
                     .. "stage (the header comes before any other byte), got it at %d", i)
            end
        end
    end
    return pipeline
end

return _M
