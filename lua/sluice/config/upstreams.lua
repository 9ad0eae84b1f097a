-- sluice.config.upstreams: the `upstreams` table, the servers a listener
-- forwards to.
--
--   upstreams   optional table keyed by name ([%w_%-%.]+):
--     servers            required non-empty array of "host:port" (no wildcard)
--                        or { "host:port", weight = 1..1000, backup = boolean }
--                        (weight 1, backup false); a host name becomes one
--                        server per address it resolves to (ctx.resolve),
--                        each with the entry's weight and backup flag; an
--                        address may appear once per upstream (one reached
--                        again through a host name is dropped); at least
--                        one server is not a backup (checked after host
--                        names are resolved, again at each new answer);
--                        with host names, a tries above the number of
--                        addresses is that number
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
--                        the answer must contain): strings, optional; or
--                        steps (check_steps below) instead of send/expect
--     resolve_interval_ms optional 0 or 100..2^31-1, default 30000: how
--                        often host names among servers are resolved again
--                        while running (0: at start and at reloads only)
--     tls                optional true or table (sluice.config.tls's
--                        check_client): sluice speaks TLS to the servers,
--                        and so do the health checks (send and expect go
--                        through TLS)
--
-- Upstreams are checked by sorted name; inside each, the keys in the order
-- above (servers in array order), send_proxy, resolve_interval_ms and tls last.
--
-- Normalized: upstreams = { [name] = { name, servers = { address with
-- weight, backup (true or nil), and for a resolved host name its
-- "name:port" as `name` }, balance, connect_timeout_ms, tries, max_fails, fail_timeout_ms,
-- health_check (or nil) = { interval_ms, timeout_ms, fails, passes, send,
-- expect, steps (or nil) = { { send | expect | expect_regex = string } } }, send_proxy (1, 2 or nil), resolve_interval_ms, tls (or nil),
-- hosts (the host names among servers, each once) } }, and the sorted list
-- of the names.

local _M = {}

local type = type
local ipairs = ipairs
local pairs = pairs
local setmetatable = setmetatable
local next = next
local format = string.format
local concat = table.concat
local floor = math.floor

local check = require("sluice.config.check")
local address = require("sluice.config.address")
local check_tls = require("sluice.config.tls").check_client
local fail, show, key_path, sorted_keys = check.fail, check.show, check.key_path, check.sorted_keys
local check_keys, check_array = check.check_keys, check.check_array
local check_positive_int, check_count = check.check_positive_int, check.check_count
local set_of, MAX_INT = check.set_of, check.MAX_INT

require("sluice.config.sandbox").exempt()

local DEFAULT_CONNECT_TIMEOUT_MS = 5000
local DEFAULT_MAX_FAILS = 1
local DEFAULT_FAIL_TIMEOUT_MS = 10000
local MAX_WEIGHT = 1000
local DEFAULT_RESOLVE_INTERVAL_MS = 30000
local MIN_RESOLVE_INTERVAL_MS = 100
local HEALTH_DEFAULTS = { interval_ms = 2000, timeout_ms = 1000, fails = 3, passes = 2 }

local UPSTREAM_KEYS = { "servers", "balance", "connect_timeout_ms", "tries", "max_fails",
                        "fail_timeout_ms", "health_check", "send_proxy", "resolve_interval_ms",
                        "tls" }
local BALANCES = { "round_robin", "least_conn", "hash", "random_two" }
local HEALTH_KEYS = { "interval_ms", "timeout_ms", "fails", "passes", "send", "expect", "steps" }
local STEP_KINDS = { "send", "expect", "expect_regex" }
local STEP_MAX = { send = 1024, expect = 256, expect_regex = 256 }
local MAX_STEPS = 32

local SERVER_EXPECTED = '"host:port" or { "host:port", weight = n, backup = true }'

-- The addresses of the host name in addr (family "name"), by
-- resolve(name): a non-empty array of { host, family }, or nil and why.
local function resolve_name(addr, path, resolve)
    if resolve == nil then
        fail(path, "cannot resolve %s: host names are resolved by sluice itself (this "
             .. "validation has no resolver)", show(addr.name))
    end
    local found, why = resolve(addr.name)
    if type(found) ~= "table" or found[1] == nil then
        fail(path, "cannot resolve %s: %s", show(addr.name),
             found == nil and tostring(why or "no address") or "no address")
    end
    local out = {}
    for i, a in ipairs(found) do
        local text = a.family == "inet6" and format("[%s]:%d", a.host, addr.port)
                     or format("%s:%d", a.host, addr.port)
        out[i] = address.check(text, path, false)
        out[i].name = addr.text
    end
    return out
end

-- The entry at `path`: { addr = its normalized address (a host name has
-- family "name"), weight, backup (true or nil), path }.
local function parse_server(v, path)
    local text, weight, backup = v, 1, nil
    if type(v) == "table" then
        local extra = sorted_keys(v, function(k)
            return k ~= 1 and k ~= "weight" and k ~= "backup"
        end)
        if extra[1] ~= nil then
            fail(key_path(path, extra[1]),
                 'unknown key (expected the address at [1], an optional weight and an '
                 .. 'optional backup)')
        end
        weight = v.weight
        if weight ~= nil and (type(weight) ~= "number" or weight ~= floor(weight)
                              or weight < 1 or weight > MAX_WEIGHT) then
            fail(path .. ".weight", "expected an integer from 1 to %d, got %s",
                 MAX_WEIGHT, show(weight))
        end
        backup = v.backup
        if backup ~= nil and type(backup) ~= "boolean" then
            fail(path .. ".backup", "expected a boolean, got %s", show(backup))
        end
        text, path, weight, backup = v[1], path .. "[1]", weight or 1, backup or nil
    elseif type(v) ~= "string" then
        fail(path, "expected %s, got %s", SERVER_EXPECTED, show(v))
    end
    return { addr = address.check(text, path, false), weight = weight, backup = backup,
             path = path, text = text }
end

-- Appends the normalized servers of entry e (parse_server) to out: its
-- address with its weight, or one per address of a host name. seen:
-- address text -> the path of the entry that has it.
local function add_server(e, out, seen, resolve)
    local addr = e.addr
    local addrs = addr.family == "name" and resolve_name(addr, e.path, resolve) or { addr }
    for _, a in ipairs(addrs) do
        local other = seen[a.text]
        if other and not a.name and not other.name then
            fail(e.path, "expected each address once, got %s, which %s has already", show(e.text),
                 other.path)
        end
        -- An address reached again through a host name (two names for one
        -- server, as in a migration) is the same server: the first entry
        -- keeps it, with its weight, and it is a primary if any entry that
        -- reaches it is one (a backup name that resolves to a listed
        -- primary does not make that primary a backup).
        if not other then
            seen[a.text] = { path = e.path, name = a.name, server = a }
            a.weight = e.weight
            a.backup = e.backup
            out[#out + 1] = a
        elseif not e.backup then
            other.server.backup = nil
        end
    end
end

-- The servers of an upstream's entries and its tries (`tries` as given,
-- nil for the default), resolving host names with resolve.
local function expand(entries, tries, path, resolve)
    local out, seen, named, primaries = {}, {}, false, 0
    for _, e in ipairs(entries) do
        add_server(e, out, seen, resolve)
        named = named or e.addr.family == "name"
    end
    for _, a in ipairs(out) do
        if not a.backup then primaries = primaries + 1 end
    end
    if primaries == 0 then
        -- Backups serve only while no primary is available: an upstream
        -- of backups alone would never be used as configured.
        fail(path .. ".servers", "expected at least one server without backup = true, got "
             .. "%d backup server%s only", #out, #out == 1 and "" or "s")
    end
    if tries == nil then
        tries = #out
    elseif named and type(tries) == "number" and tries == floor(tries) and tries > #out then
        -- Host names answer with as many addresses as they have today: a
        -- tries above that tries them all (a DNS answer that shrank does
        -- not refuse a reload).
        tries = #out
    elseif type(tries) ~= "number" or tries ~= floor(tries) or tries < 1 or tries > #out then
        fail(path .. ".tries", "expected an integer from 1 to %d (the number of servers), got %s",
             #out, show(tries))
    end
    return out, tries
end

-- health_check.steps: nil, or a non-empty array of at most MAX_STEPS
-- tables, each with exactly one of send (1 to 1024 bytes), expect (1 to 256
-- bytes) or expect_regex (1 to 256 bytes; compiled when the configuration
-- is loaded, where a bad one is refused). Returns a copy.
local function check_steps(steps, path)
    if steps == nil then return nil end
    if type(steps) ~= "table" or next(steps) == nil then
        fail(path, 'expected a non-empty array of steps ({ send = "..." }, { expect = "..." }, '
             .. '{ expect_regex = "..." }), got %s', show(steps))
    end
    local n = check_array(steps, path)
    if n > MAX_STEPS then
        fail(path, "expected at most %d steps, got %d", MAX_STEPS, n)
    end
    local out = {}
    for i = 1, n do
        local st, spath = steps[i], format("%s[%d]", path, i)
        if type(st) ~= "table" then
            fail(spath, 'expected a table { send = "..." }, { expect = "..." } or '
                 .. '{ expect_regex = "..." }, got %s', show(st))
        end
        check_keys(st, spath, STEP_KINDS)
        local kinds = {}
        for _, k in ipairs(STEP_KINDS) do
            if st[k] ~= nil then kinds[#kinds + 1] = k end
        end
        if #kinds ~= 1 then
            fail(spath, "expected exactly one of send, expect, expect_regex, got %s",
                 #kinds == 0 and "none" or concat(kinds, " and "))
        end
        local k = kinds[1]
        local v = st[k]
        if type(v) ~= "string" or #v == 0 or #v > STEP_MAX[k] then
            fail(spath .. "." .. k, "expected a string of 1 to %d bytes, got %s", STEP_MAX[k], show(v))
        end
        if k == "expect_regex" and v:find("\0", 1, true) then
            fail(spath .. "." .. k, "expected a regular expression without NUL bytes, got %s", show(v))
        end
        out[i] = { [k] = v }
    end
    return out
end

-- health_check = { interval_ms, timeout_ms, fails, passes, send, expect,
-- steps }: all optional; steps and send/expect exclude each other.
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
    local send, expect = bytes("send", 1024), bytes("expect", 256)
    local steps = check_steps(h.steps, path .. ".steps")
    if steps and (send or expect) then
        local key = send and "send" or "expect"
        fail(path .. "." .. key, "expected no %s with steps (make it a step: { %s = ... }), got %s",
             key, key, show(h[key]))
    end
    return {
        interval_ms = interval,
        timeout_ms = timeout,
        fails = fails,
        passes = passes,
        send = send,
        expect = expect,
        steps = steps,
    }
end

-- send_proxy = "v1" or "v2": the PROXY protocol header sent first on each
-- connection to the upstream's servers. Returns 1, 2 or nil.
local function check_send_proxy(v, path)
    if v == nil then return nil end
    if v == "v1" then return 1 elseif v == "v2" then return 2 end
    fail(path, 'expected "v1" or "v2", got %s', show(v))
end

-- resolve_interval_ms: 0 (never while running) or at least 100 ms.
local function check_resolve_interval(v, path)
    if v == nil then return DEFAULT_RESOLVE_INTERVAL_MS end
    if type(v) ~= "number" or v ~= floor(v) or v > MAX_INT
       or (v ~= 0 and v < MIN_RESOLVE_INTERVAL_MS) then
        fail(path, "expected 0 (never) or an integer from %d to %d, got %s",
             MIN_RESOLVE_INTERVAL_MS, MAX_INT, show(v))
    end
    return v
end

-- What reexpand needs of a normalized upstream (kept beside it, out of
-- the table the loader returns): its parsed entries, tries as given, path.
local sources = setmetatable({}, { __mode = "k" })

-- Returns the normalized upstream `name`.
local function check_upstream(name, up, path, resolve, config_dir)
    if type(up) ~= "table" then
        fail(path, "expected a table { servers = { \"host:port\", ... } }, got %s", show(up))
    end
    check_keys(up, path, UPSTREAM_KEYS)
    local spath = path .. ".servers"
    local servers = up.servers
    if type(servers) ~= "table" or next(servers) == nil then
        fail(spath, 'expected a non-empty array of "host:port" strings, got %s', show(servers))
    end
    local entries, hosts, seen_host = {}, {}, {}
    for i = 1, check_array(servers, spath) do
        local e = parse_server(servers[i], format("%s[%d]", spath, i))
        entries[i] = e
        local host = e.addr.family == "name" and e.addr.name
        if host and not seen_host[host] then
            seen_host[host] = true
            hosts[#hosts + 1] = host
        end
    end
    local out, tries = expand(entries, up.tries, path, resolve)
    local balance = up.balance
    if balance == nil then
        balance = "round_robin"
    elseif not set_of(BALANCES)[balance] then
        fail(path .. ".balance", 'expected one of "%s", got %s', concat(BALANCES, '", "'),
             show(balance))
    end
    local connect_timeout = check_positive_int(up.connect_timeout_ms,
        path .. ".connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS)
    local u = {
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
        resolve_interval_ms = check_resolve_interval(up.resolve_interval_ms,
                                                     path .. ".resolve_interval_ms"),
        tls = check_tls(up.tls, path .. ".tls", config_dir),
        hosts = hosts,
    }

    sources[u] = { entries = entries, tries = up.tries, path = path }
    return u
end

-- Returns the normalized upstreams table and the sorted list of their names.
-- resolve: the resolver for host names (sluice.config's opts.resolve), or
-- nil (host names are then refused). config_dir: the configuration's
-- folder (relative tls files start there), or nil.
function _M.check(ups, resolve, config_dir)
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
        out[name] = check_upstream(name, ups[name], path, resolve, config_dir)
    end
    return out, names
end

-- The upstreams ups (normalized by check, names their sorted names) with
-- the servers their host names have now by resolve (the running process's
-- cached answers): a copy of each upstream that has host names and a
-- resolve_interval_ms, with its servers and tries expanded again; the
-- others as they are (resolve_interval_ms = 0: never while running, even
-- for a name another upstream shares). Raises as
-- check does (a name that no longer resolves).
function _M.reexpand(ups, names, resolve)
    local out = {}
    for _, name in ipairs(names) do
        local u = ups[name]
        if u.hosts[1] ~= nil and u.resolve_interval_ms > 0 then
            local src, c = sources[u], {}
            for k, v in pairs(u) do c[k] = v end
            c.servers, c.tries = expand(src.entries, src.tries, src.path, resolve)
            u = c
        end
        out[name] = u
    end
    return out
end

return _M
