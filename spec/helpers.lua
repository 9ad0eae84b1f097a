-- Test helpers shared by the busted specs: free ports, temporary files,
-- starting the real sluice binary and real peers, and stopping them by PID.
-- Every process a spec starts is stopped by the spec; every wait is bounded.
-- Temporary files live in one folder per spec file, removed when the file
-- ends (SLUICE_KEEP_TMP=1 keeps it; see H.tmpdir).
local ffi = require("ffi")

local H = {}

H.root = os.getenv("SLUICE_ROOT") or "."
H.bin = os.getenv("SLUICE_BIN") or (H.root .. "/build/sluice")
H.wrapper = os.getenv("SLUICE_WRAPPER") or ""

ffi.cdef[[
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int getsockname(int fd, void *addr, unsigned int *len);
int close(int fd);
int usleep(unsigned int usec);
int getpid(void);
int listen(int fd, int backlog);
int connect(int fd, const void *addr, unsigned int len);
int accept(int fd, void *addr, void *len);
int setsockopt(int fd, int level, int name, const void *val, unsigned int len);
struct sl_spec_pollfd { int fd; short events; short revents; };
int poll(struct sl_spec_pollfd *fds, unsigned long n, int timeout);
long read(int fd, void *buf, unsigned long n);
long write(int fd, const void *buf, unsigned long n);
struct sl_spec_timespec { long sec; long nsec; };
int clock_gettime(int clk, struct sl_spec_timespec *ts);
struct sl_spec_sockaddr_in { uint16_t family; uint16_t port; uint32_t addr; uint8_t zero[8]; };
]]

function H.sleep(seconds)
  ffi.C.usleep(math.floor(seconds * 1e6))
end

-- A TCP socket bound to 127.0.0.1 on a port the kernel picks; listening
-- when backlog is given. Returns fd, the sockaddr and the port.
local function bound_socket(backlog)
  local fd = ffi.C.socket(2, 1, 0)
  assert(fd >= 0, "socket() failed")
  local sa = ffi.new("struct sl_spec_sockaddr_in")
  sa.family = 2
  sa.addr = 0x0100007f -- 127.0.0.1, network order on little-endian
  assert(ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0, "bind() failed")
  if backlog then assert(ffi.C.listen(fd, backlog) == 0, "listen() failed") end
  local len = ffi.new("unsigned int[1]", ffi.sizeof(sa))
  assert(ffi.C.getsockname(fd, sa, len) == 0)
  local port = bit.bor(bit.lshift(bit.band(sa.port, 0xff), 8), bit.rshift(sa.port, 8))
  return fd, sa, port
end

-- A TCP port on 127.0.0.1 that nothing uses right now, picked below the
-- kernel's ephemeral range (32768 and up), so that the outgoing connections
-- of this and other processes cannot take it before the spec listens on it.
-- A new TCP socket and the address 127.0.0.1:port for it.
local function loopback_socket(port)
  local fd = ffi.C.socket(2, 1, 0)
  assert(fd >= 0, "socket() failed")
  local sa = ffi.new("struct sl_spec_sockaddr_in")
  sa.family = 2
  sa.addr = 0x0100007f
  sa.port = bit.bor(bit.lshift(bit.band(port, 0xff), 8), bit.rshift(port, 8))
  return fd, sa
end

local picked = {}
math.randomseed(os.time() + tonumber(ffi.C.getpid()))
function H.free_port()
  for _ = 1, 1000 do
    local port = math.random(20000, 32767)
    if not picked[port] then
      local fd, sa = loopback_socket(port)
      local ok = ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0
      ffi.C.close(fd)
      if ok then
        picked[port] = true
        return port
      end
    end
  end
  error("no free port between 20000 and 32767")
end

-- A port whose listener never accepts and whose accept queue is full, so
-- that new connects hang (the kernel drops their SYNs): for connect timeouts.
-- Returns the port and a function that closes every socket involved.
function H.blackhole()
  local fd, sa, port = bound_socket(0)
  local fds = { fd }
  for _ = 1, 4 do -- fill the accept queue (backlog 0 holds one or two)
    local c = ffi.C.socket(2, bit.bor(1, 0x800), 0) -- SOCK_NONBLOCK
    ffi.C.connect(c, sa, ffi.sizeof(sa))
    fds[#fds + 1] = c
  end
  return port, function()
    for _, f in ipairs(fds) do ffi.C.close(f) end
  end
end

-- A listener driven from the spec itself, for peers that must misbehave in
-- ways socat cannot (reset a connection). Returns an object with port,
-- accept(timeout_s) -> fd or nil, reset(fd) (close with RST: SO_LINGER 0),
-- read(fd, timeout_s) -> string or nil, close().
local function ready(f, timeout)
  local p = ffi.new("struct sl_spec_pollfd[1]")
  p[0].fd, p[0].events = f, 1 -- POLLIN
  return ffi.C.poll(p, 1, math.floor(timeout * 1000)) == 1
end

function H.raw_listener()
  local fd, _, port = bound_socket(16)
  local L = { port = port }
  function L.accept(timeout)
    if not ready(fd, timeout or 10) then return nil end
    local c = ffi.C.accept(fd, nil, nil)
    return c >= 0 and c or nil
  end
  function L.read(c, timeout)
    if not ready(c, timeout or 10) then return nil end
    local buf = ffi.new("char[4096]")
    local n = ffi.C.read(c, buf, 4096)
    return n >= 0 and ffi.string(buf, n) or nil
  end
  function L.reset(c)
    local linger = ffi.new("int[2]", 1, 0) -- struct linger { on, 0 seconds }
    ffi.C.setsockopt(c, 1, 13, linger, 8)  -- SOL_SOCKET, SO_LINGER
    ffi.C.close(c)
  end
  function L.close() ffi.C.close(fd) end
  return L
end

-- A client connection to 127.0.0.1:port held by the spec itself, for
-- tests that need several connections open at once. Returns an object with
-- send(s), recv(n, timeout_s) -> the next n bytes (fewer if the peer closed;
-- nil on timeout), close(), and its socket fd. opts.rcvbuf: SO_RCVBUF in
-- bytes, set before the connect (a small window: a client that reads
-- little stalls its sender soon).
function H.connect(port, opts)
  local fd, sa = loopback_socket(port)
  if opts and opts.rcvbuf then
    local v = ffi.new("int[1]", opts.rcvbuf)
    assert(ffi.C.setsockopt(fd, 1, 8, v, 4) == 0, "SO_RCVBUF refused")  -- SOL_SOCKET, SO_RCVBUF
  end
  assert(ffi.C.connect(fd, sa, ffi.sizeof(sa)) == 0, "connect() to port " .. port .. " failed")
  local c = { fd = fd }
  function c.send(s)
    -- send(2) with MSG_NOSIGNAL: a write to a reset connection fails here
    -- (EPIPE) instead of killing the spec with SIGPIPE.
    pcall(ffi.cdef, "long send(int fd, const void *buf, unsigned long n, int flags);")
    assert(ffi.C.send(fd, s, #s, 0x4000) == #s, "short write")
  end
  function c.recv(n, timeout)
    local got, buf = {}, ffi.new("char[4096]")
    local have, deadline = 0, H.now() + (timeout or 10)
    while have < n do
      local left = deadline - H.now()
      if left <= 0 or not ready(fd, left) then return nil end
      local r = tonumber(ffi.C.read(fd, buf, math.min(4096, n - have)))
      if r <= 0 then break end
      got[#got + 1] = ffi.string(buf, r)
      have = have + r
    end
    return table.concat(got)
  end
  function c.close() ffi.C.close(fd) end
  function c.shutdown()   -- ends the output: a FIN, the input stays open
    pcall(ffi.cdef, "int shutdown(int fd, int how);")
    assert(ffi.C.shutdown(fd, 1) == 0, "shutdown() failed")
  end
  return c
end

-- In-process specs (the core through SLUICE_CORE_LIB): gives the calling
-- describe block a buffer pool of its own, and fails any test that leaves a
-- buffer outstanding. Returns a table whose .base holds the pool's stats as
-- each test started.
function H.with_pool()
  local pool = require("sluice").pool
  local guard = {}
  local spec = getfenv(2) -- busted's setup, teardown, ... live in the spec's environment
  local assert = spec.assert
  spec.setup(function() pool.open() end)
  spec.teardown(function() assert.are.equal(0, pool.close()) end)
  spec.before_each(function()
    collectgarbage()
    guard.base = pool.stats()
  end)
  spec.after_each(function()
    collectgarbage()
    local now = pool.stats()
    assert.are.equal(guard.base.blocks_in_use, now.blocks_in_use, "buffers left outstanding")
    assert.are.equal(guard.base.bytes_in_use, now.bytes_in_use, "bytes left outstanding")
  end)
  return guard
end

-- Runs a shell command; returns its stdout and exit status.
function H.sh(cmd)
  local f = assert(io.popen(cmd .. "; echo \"__rc=$?\""))
  local out = f:read("*a")
  f:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return out:gsub("__rc=%d+%s*$", ""), rc
end

function H.shq(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local tmpdir
-- A folder of the spec file's own for its files (inputs, outputs, logs,
-- configs), removed when the file ends (its bulk inputs run to hundreds of
-- MiB), unless SLUICE_KEEP_TMP=1 keeps it to look at.
function H.tmpdir()
  if not tmpdir then
    tmpdir = (H.sh("mktemp -d /tmp/sluice-spec.XXXXXX")):gsub("%s+$", "")
    if os.getenv("SLUICE_KEEP_TMP") ~= "1" then
      local mine = tmpdir
      require("busted").subscribe({ "file", "end" }, function()
        os.execute("rm -rf " .. H.shq(mine))
        if tmpdir == mine then tmpdir = nil end
        return nil, true
      end)
    end
  end
  return tmpdir
end

local seq = 0
function H.tmpfile(name, content)
  seq = seq + 1
  local base, ext = name:match("^(.-)(%.?[^.]*)$")
  local path = ("%s/%s_%d%s"):format(H.tmpdir(), base, seq, ext)
  if content then
    local f = assert(io.open(path, "wb"))
    f:write(content)
    f:close()
  end
  return path
end

function H.read(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("*a")
  f:close()
  return s
end

-- Seconds on the monotonic clock.
local ts = ffi.new("struct sl_spec_timespec")
function H.now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
end

-- Waits until fn() is true, for at most timeout seconds. Returns fn's value.
function H.wait_for(fn, timeout)
  local deadline = H.now() + (timeout or 10)
  repeat
    local v = fn()
    if v then return v end
    H.sleep(0.02)
  until H.now() > deadline
  return fn()
end

-- Starts a command in the background; returns { pid, log, rc_file }.
function H.spawn(cmd, name)
  local log = H.tmpfile((name or "proc") .. ".log", "")
  local pidf = H.tmpfile((name or "proc") .. ".pid")
  local rcf = H.tmpfile((name or "proc") .. ".rc")
  os.execute(("( %s >>%s 2>&1 & echo $! >%s; wait $!; echo $? >%s ) >/dev/null 2>&1 &")
    :format(cmd, H.shq(log), H.shq(pidf), H.shq(rcf)))
  local pid = H.wait_for(function() return tonumber(H.read(pidf)) end, 5)
  assert(pid, "could not start: " .. cmd)
  local p = { pid = pid, log = log, rc_file = rcf, cmd = cmd }
  H.spawned[#H.spawned + 1] = p
  return p
end

-- Every process a spec file started: whatever a failed test left running is
-- stopped (by its PID) when the file ends.
H.spawned = {}
local ok_busted, busted = pcall(require, "busted")
if ok_busted and busted.subscribe then
  busted.subscribe({ "file", "end" }, function()
    for i = #H.spawned, 1, -1 do
      local p = H.spawned[i]
      H.spawned[i] = nil
      if H.read(p.rc_file) == "" then
        os.execute(("kill -KILL %d 2>/dev/null"):format(p.pid))
        H.wait_for(function() return H.read(p.rc_file) ~= "" end, 5)
      end
    end
    return nil, true
  end)
end

function H.alive(p)
  return H.read(p.rc_file) == "" and select(2, H.sh("kill -0 " .. p.pid .. " 2>/dev/null")) == 0
end

-- Sends sig (default TERM) and waits for the exit. Returns the exit status
-- (nil if it did not exit in time; it is then killed).
function H.stop(p, sig, timeout)
  if H.read(p.rc_file) == "" then
    os.execute(("kill -%s %d 2>/dev/null"):format(sig or "TERM", p.pid))
  end
  local rc = H.wait_for(function() return tonumber(H.read(p.rc_file)) end, timeout or 20)
  if not rc then
    os.execute(("kill -KILL %d 2>/dev/null"):format(p.pid))
    H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 5)
  end
  return rc
end

-- Is something accepting on 127.0.0.1:port?
function H.port_open(port)
  local _, rc = H.sh(("socat -T1 /dev/null TCP:127.0.0.1:%d,connect-timeout=1 2>/dev/null"):format(port))
  return rc == 0
end

-- Writes a config and starts sluice on it; waits until it logs that it started.
function H.start_sluice(config_text, env)
  local cfg = H.tmpfile("sluice.lua", config_text)
  local p = H.spawn(("%s SLUICE_ROOT=%s %s %s -c %s"):format(
    env and ("env " .. env) or "env", H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg)), "sluice")
  local ok = H.wait_for(function()
    return H.read(p.log):find("started with", 1, true) or not H.alive(p)
  end, 30)
  assert(ok and H.alive(p), "sluice did not start:\n" .. H.read(p.log))
  p.config = cfg
  return p
end

-- Stops sluice with SIGTERM and checks what every test must see: exit 0,
-- the pool back to zero, and no leak reported (unless the spec provokes one
-- on purpose: opts.leaks_expected).
function H.stop_sluice(p, opts)
  local rc = H.stop(p, "TERM")
  local log = H.read(p.log)
  assert(rc == 0, ("sluice exited with %s:\n%s"):format(tostring(rc), log))
  -- Every worker reports its pool clean, and the last line says so for all.
  local workers = tonumber(log:match("started with (%d+) worker"))
  assert(workers, "no start line:\n" .. log)
  for i = 0, workers - 1 do
    assert(log:find(("worker %d: pool clean at exit"):format(i), 1, true),
           ("worker %d: pool not clean at exit:\n%s"):format(i, log))
  end
  local last = log:match("([^\n]*)\n?$")
  assert(last:match("%] stopped$"), "the last line is not a clean stop:\n" .. log)
  if not (opts and opts.leaks_expected) then
    assert(not log:find("LEAK", 1, true), "leak reported:\n" .. log)
  end
  return log
end

-- A socat echo peer on a fresh port (each connection gets its own cat).
function H.start_echo(port)
  port = port or H.free_port()
  local p = H.spawn(("socat TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork EXEC:cat"):format(port), "echo")
  assert(H.wait_for(function() return H.port_open(port) end, 10), "echo peer did not start")
  p.port = port
  return p
end

-- Inside a describe: a list of processes (peers) that after_each kills
-- and empties. Append what a test starts: list[#list + 1] = H.start_echo().
function H.killed_after_each()
  local list = {}
  require("busted").after_each(function()
    for _, p in ipairs(list) do H.stop(p, "KILL") end
    for i = #list, 1, -1 do list[i] = nil end
  end)
  return list
end

-- A socat peer that runs a shell command per connection (stdin/stdout = socket).
-- opts: extra socat options (e.g. "-t 30": after the command's output ends,
-- keep going until the socket side has taken all of it).
function H.start_peer(cmd, port, opts)
  port = port or H.free_port()
  local p = H.spawn(("socat %s TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork SYSTEM:%s")
    :format(opts or "", port, H.shq(cmd)), "peer")
  assert(H.wait_for(function() return H.port_open(port) end, 10), "peer did not start")
  p.port = port
  return p
end

-- A socat peer that answers every connection with name (one letter), then
-- echoes: which server a proxied connection reached shows in its reply.
function H.start_named_peer(name, port)
  return H.start_peer("printf " .. name .. "; cat", port)
end

-- Sends n short requests ("x"), one connection each, to 127.0.0.1:port;
-- returns the replies' first letters counted ({ A = 3, B = 3 }; a reply
-- that is not a letter and "x" counts as "other:REPLY") and every reply,
-- joined with "|", for messages.
function H.spread(port, n)
  local count, replies = {}, {}
  for i = 1, n do
    local out = H.exchange(port, "x", 10)
    replies[i] = out
    local who = out:match("^(%u)x$") or ("other:" .. out)
    count[who] = (count[who] or 0) + 1
  end
  return count, table.concat(replies, "|")
end

-- A redis-server on a fresh port, without persistence; waits for PONG.
function H.start_redis(port)
  port = port or H.free_port()
  local p = H.spawn(("redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no")
    :format(port), "redis")
  assert(H.wait_for(function()
    return (H.sh(("redis-cli -p %d PING 2>/dev/null"):format(port))):find("PONG", 1, true)
  end, 10), "redis-server did not start:\n" .. H.read(p.log))
  p.port = port
  return p
end

-- An nginx answering every request with `body` (100 bytes by default), in
-- the foreground (one process, stopped by its PID), everything it writes in
-- a folder of the spec's own.
function H.start_nginx(port, body)
  port = port or H.free_port()
  body = body or string.rep("x", 99) .. "\n"
  local dir = H.tmpfile("nginx")
  H.sh("mkdir -p " .. H.shq(dir) .. "/logs")
  local conf = H.tmpfile("nginx.conf", ([[
daemon off;
master_process off;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %s/body;
  proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi;
  uwsgi_temp_path %s/uwsgi;
  scgi_temp_path %s/scgi;
  server {
    listen 127.0.0.1:%d;
    location / { default_type text/plain; return 200 %q; }
  }
}
]]):format(dir, dir, dir, dir, dir, dir, dir, port, body))
  local p = H.spawn(("nginx -p %s -c %s"):format(H.shq(dir), H.shq(conf)), "nginx")
  assert(H.wait_for(function() return H.port_open(port) end, 10),
         "nginx did not start:\n" .. H.read(p.log))
  p.port = port
  return p
end

-- A socat client on 127.0.0.1:port that sends `first`, waits until the spec
-- calls release(), sends `second` (if any) and half-closes; what it receives
-- goes to the file `out`. finish() waits for it to end and returns its exit
-- status.
function H.held_client(port, first, second)
  local go = H.tmpfile("go")
  local out = H.tmpfile("held.out", "")
  local script = ("printf %s; while [ ! -e %s ]; do sleep 0.02; done; printf %s")
    :format(H.shq(first), H.shq(go), H.shq(second or ""))
  local p = H.spawn(("sh -c %s"):format(H.shq(("(%s) | socat -t 10 - TCP:127.0.0.1:%d > %s")
    :format(script, port, H.shq(out)))), "held")
  return { proc = p, out = out, go = go,
           release = function() H.sh("touch " .. H.shq(go)) end,
           -- Waits for the client to end; returns its exit status.
           finish = function() return H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 20) end }
end

-- An admin request: GET path on 127.0.0.1:port. Returns status, headers, body.
-- timeout: seconds the answer may take (10 by default).
function H.admin_get(port, path, timeout)
  local out = H.exchange(port, ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):format(path),
                         timeout or 10)
  local head, body = out:match("^(.-)\r\n\r\n(.*)$")
  return tonumber(out:match("^HTTP/1%.1 (%d%d%d) ")), head or "", body or ""
end

-- The value of one sample of Prometheus text (nil when absent), e.g.
-- H.sample(text, "sluice_received_bytes_total", 'listener="front"').
function H.sample(text, name, labels)
  local want = name .. (labels and ("{" .. labels .. "}") or "")
  for line in text:gmatch("[^\n]+") do
    local k, v = line:match("^(%S+) (%S+)$")
    if k == want then return tonumber(v) end
  end
  return nil
end

-- The same, read from sluice's /metrics on the admin port.
function H.metric(admin_port, name, labels, timeout)
  return H.sample(select(3, H.admin_get(admin_port, "/metrics", timeout)), name, labels)
end

-- Waits until sluice has read `bytes` in all from the clients of a listener
-- (so that what a spec sends next arrives in a later read). True when it has.
function H.wait_received(admin_port, listener, bytes)
  return H.wait_for(function()
    return H.metric(admin_port, "sluice_received_bytes_total", ('listener="%s"'):format(listener)) == bytes
  end, 10)
end

-- Sends input (a string, or { file = path }) to 127.0.0.1:port, half-closes,
-- and returns everything received until the server closes.
function H.exchange(port, input, timeout)
  local src
  if type(input) == "table" then
    src = H.shq(input.file)
  else
    src = H.shq(H.tmpfile("in", input))
  end
  local out = H.tmpfile("out")
  local _, rc = H.sh(("timeout %d socat -t %d - TCP:127.0.0.1:%d <%s >%s 2>/dev/null"):format(
    (timeout or 30) + 5, timeout or 30, port, src, H.shq(out)))
  return H.read(out), rc, out
end

-- What worker 0's pool holds now, read from /metrics: { live buffers, bytes }.
function H.pool_held(admin_port)
  return { H.metric(admin_port, "sluice_pool_buffers", 'worker="0"'),
           H.metric(admin_port, "sluice_pool_in_use_bytes", 'worker="0"') }
end

-- Waits until worker 0's pool holds what it held at `base` (H.pool_held).
-- True when it does.
function H.pool_back(admin_port, base)
  return H.wait_for(function()
    local now = H.pool_held(admin_port)
    return now[1] == base[1] and now[2] == base[2]
  end, 20)
end

-- Waits until the file at path has at least n lines; returns them (a
-- table, empty when it never had n).
function H.log_lines(path, n)
  return H.wait_for(function()
    local lines = {}
    for l in H.read(path):gmatch("[^\n]+") do lines[#lines + 1] = l end
    return #lines >= n and lines
  end, 30) or {}
end

-- A self-signed certificate for CN=name and its key (EC P-256), made now
-- with the openssl command in dir; returns their paths.
function H.make_cert(dir, name)
  local cert, key = dir .. "/" .. name .. ".crt", dir .. "/" .. name .. ".key"
  local _, rc = H.sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    .. "-keyout %s -out %s -days 2 -subj /CN=%s 2>/dev/null"):format(H.shq(key), H.shq(cert), name))
  assert(rc == 0, "openssl req failed")
  return cert, key
end

-- A certificate authority in dir (it signs certificates and CRLs): its
-- certificate and key (name.crt, name.key).
function H.make_ca(dir, name)
  local cert, key = dir .. "/" .. name .. ".crt", dir .. "/" .. name .. ".key"
  local _, rc = H.sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    .. "-keyout %s -out %s -days 2 -subj /CN=%s -addext basicConstraints=critical,CA:TRUE "
    .. "-addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null")
    :format(H.shq(key), H.shq(cert), H.shq(name)))
  assert(rc == 0, "openssl req (CA) failed")
  return cert, key
end

-- A certificate for name signed by the CA (make_ca's files ca_cert,
-- ca_key), with the subject alternative names san ("DNS:x,IP:127.0.0.1";
-- default DNS:name). Returns its files (name.crt, name.key in dir).
function H.make_signed_cert(dir, name, ca_cert, ca_key, san)
  local cert, key = dir .. "/" .. name .. ".crt", dir .. "/" .. name .. ".key"
  local csr, ext = dir .. "/" .. name .. ".csr", dir .. "/" .. name .. ".ext"
  local f = assert(io.open(ext, "wb"))
  f:write("subjectAltName=" .. (san or ("DNS:" .. name)) .. "\n")
  f:close()
  local _, rc = H.sh(("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
    .. "-keyout %s -out %s -subj /CN=%s 2>/dev/null && openssl x509 -req -in %s -CA %s "
    .. "-CAkey %s -CAcreateserial -days 2 -extfile %s -out %s 2>/dev/null")
    :format(H.shq(key), H.shq(csr), H.shq(name), H.shq(csr), H.shq(ca_cert), H.shq(ca_key),
            H.shq(ext), H.shq(cert)))
  assert(rc == 0, "openssl x509 -req failed")
  return cert, key
end

-- The index of a CA's certificates (openssl ca's index.txt) in a fresh
-- folder of dir: each of certs as valid, each of revoked as revoked; and
-- an openssl ca configuration over it. Returns the configuration's path.
local ca_seq = 0
local function ca_db(dir, ca_cert, ca_key, certs, revoked)
  ca_seq = ca_seq + 1
  local db = ("%s/cadb_%d"):format(dir, ca_seq)
  H.sh("mkdir -p " .. H.shq(db))
  local lines = {}
  local function add(cert, status)
    local serial = H.sh("openssl x509 -noout -serial -in " .. H.shq(cert)):match("serial=(%x+)")
    local subject = H.sh("openssl x509 -noout -subject -nameopt compat -in " .. H.shq(cert))
      :match("subject=%s*([^\n]+)"):gsub("%s+$", "")
    lines[#lines + 1] = table.concat({ status, "301231235959Z",
      status == "R" and "240101000000Z" or "", serial, "unknown", subject }, "\t")
  end
  for _, c in ipairs(certs or {}) do add(c, "V") end
  for _, c in ipairs(revoked or {}) do add(c, "R") end
  local f = assert(io.open(db .. "/index.txt", "wb"))
  f:write(table.concat(lines, "\n") .. (#lines > 0 and "\n" or ""))
  f:close()
  f = assert(io.open(db .. "/index.txt.attr", "wb"))
  f:write("unique_subject = no\n")
  f:close()
  local cnf = db .. "/ca.cnf"
  f = assert(io.open(cnf, "wb"))
  f:write(("[ca]\ndefault_ca = d\n[d]\ndatabase = %s/index.txt\ncertificate = %s\n"
    .. "private_key = %s\ncrlnumber = %s/crlnumber\ndefault_md = sha256\n"
    .. "default_crl_days = 1\n"):format(db, ca_cert, ca_key, db))
  f:close()
  f = assert(io.open(db .. "/crlnumber", "wb"))
  f:write("01\n")
  f:close()
  return cnf, db
end

-- A CRL of the CA (make_ca's files) that revokes the certificates in the
-- array revoked (may be empty), made with openssl ca -gencrl. Returns its
-- path (PEM).
function H.make_crl(dir, ca_cert, ca_key, revoked)
  local cnf, db = ca_db(dir, ca_cert, ca_key, {}, revoked)
  local crl = db .. "/ca.crl"
  local out, rc = H.sh(("openssl ca -config %s -gencrl -out %s 2>&1")
    :format(H.shq(cnf), H.shq(crl)))
  assert(rc == 0, "openssl ca -gencrl failed: " .. out)
  return crl
end

-- An OCSP response (DER) the CA signs for cert: good, or revoked when
-- opts.revoked; valid for a day. Returns its path.
function H.make_ocsp(dir, ca_cert, ca_key, cert, opts)
  opts = opts or {}
  local cnf, db = ca_db(dir, ca_cert, ca_key, not opts.revoked and { cert } or {},
                        opts.revoked and { cert } or {})
  local resp = db .. "/resp.der"
  local out, rc = H.sh(("openssl ocsp -index %s -rsigner %s -rkey %s -CA %s -issuer %s -cert %s "
    .. "-respout %s -ndays 1 2>&1"):format(H.shq(db .. "/index.txt"), H.shq(ca_cert),
      H.shq(ca_key), H.shq(ca_cert), H.shq(ca_cert), H.shq(cert), H.shq(resp)))
  assert(rc == 0, "openssl ocsp failed: " .. out)
  return resp
end

-- Sends the file at input over TLS (socat OPENSSL, no verification) to
-- 127.0.0.1:port, half-closes, and returns what came back until the server
-- closed, and socat's exit status. opts.bind: the client's own
-- "address:port".
function H.tls_exchange(port, input, opts)
  opts = opts or {}
  local out = H.tmpfile("tls.out")
  local _, rc = H.sh(("timeout 60 socat -t 30 -T 50 -b 65536 - OPENSSL:127.0.0.1:%d,verify=0%s "
    .. "<%s >%s 2>%s"):format(port, opts.bind and (",bind=" .. opts.bind) or "", H.shq(input),
                              H.shq(out), H.shq(out .. ".err")))
  return H.read(out), rc
end

return H
