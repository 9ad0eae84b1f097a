-- Telling systemd what sluice does (sd_notify's protocol, Type=notify):
-- the datagrams sluice sends to NOTIFY_SOCKET at start, around each reload
-- and at stop, read here from a real datagram socket; and the reload
-- counters of /metrics that go with them.
local ffi = require("ffi")
local H = require("helpers")

pcall(ffi.cdef, [[
struct sl_spec_sockaddr_un { unsigned short family; char path[108]; };
long recv(int fd, void *buf, unsigned long n, int flags);
]])
local C = ffi.C
local AF_UNIX, SOCK_DGRAM = 1, 2

-- A datagram socket bound at path ("@name": the abstract namespace).
-- Returns an object whose next(timeout) gives the next datagram, or nil.
local function notify_socket(path)
  local fd = C.socket(AF_UNIX, SOCK_DGRAM, 0)
  assert(fd >= 0, "socket() failed")
  local sa = ffi.new("struct sl_spec_sockaddr_un")
  sa.family = AF_UNIX
  ffi.copy(sa.path, path)
  local len = 2 + #path
  if path:sub(1, 1) == "@" then sa.path[0] = 0 else len = len + 1 end
  assert(C.bind(fd, sa, len) == 0, "bind() failed for " .. path)
  local s = {}
  local buf = ffi.new("char[1024]")
  function s.next(timeout)
    local pfd = ffi.new("struct sl_spec_pollfd[1]")
    pfd[0].fd, pfd[0].events = fd, 1
    if C.poll(pfd, 1, math.floor((timeout or 10) * 1000)) <= 0 then return nil end
    local n = tonumber(C.recv(fd, buf, 1024, 0))
    return n > 0 and ffi.string(buf, n) or nil
  end
  function s.close() C.close(fd) end
  return s
end

local function config(port, admin, extra)
  return ([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "echo", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } },
  %s
}
]]):format(admin, port, extra or "")
end

describe("NOTIFY_SOCKET", function()
  for _, kind in ipairs({ "a path", "the abstract namespace" }) do
    it(("tells of readiness, reloads and the stop, on %s"):format(kind), function()
      local path = kind == "a path" and (H.tmpdir() .. "/notify.sock")
                   or ("@sluice-spec-%d-%d"):format(C.getpid(), math.random(1e9))
      local sock = notify_socket(path)
      local port, admin = H.free_port(), H.free_port()
      local p = H.start_sluice(config(port, admin), "NOTIFY_SOCKET=" .. path)
      assert.are.equal(("READY=1\nSTATUS=serving 1 listener with 1 worker\nMAINPID=%d"):format(p.pid),
                       sock.next())
      assert.are.equal(0, H.metric(admin, 'sluice_config_reloads_total', 'result="applied"'))
      assert.are.equal(1, H.metric(admin, "sluice_config_last_reload_successful"))
      local started = H.metric(admin, "sluice_config_last_applied_timestamp_seconds")
      assert.is_true(math.abs(started - os.time()) < 600, tostring(started))

      -- A reload that applies.
      H.sh("kill -HUP " .. p.pid)
      assert.matches("^RELOADING=1\nMONOTONIC_USEC=%d+$", sock.next())
      assert.are.equal("READY=1\nSTATUS=configuration reloaded from " .. p.config, sock.next())
      assert.are.equal(1, H.metric(admin, 'sluice_config_reloads_total', 'result="applied"'))

      -- One that is refused: the running configuration stays.
      local f = assert(io.open(p.config, "w"))
      f:write(config(port, admin, "workers = 0,"))
      f:close()
      H.sh("kill -HUP " .. p.pid)
      assert.matches("^RELOADING=1\n", sock.next())
      assert.matches("^READY=1\nSTATUS=reload refused, the running configuration stays: config error: ",
                     sock.next())
      assert.are.equal(1, H.metric(admin, 'sluice_config_reloads_total', 'result="refused"'))
      assert.are.equal(0, H.metric(admin, "sluice_config_last_reload_successful"))
      assert.are.equal("x", (H.exchange(port, "x", 10)))

      local log = H.stop_sluice(p)
      assert.matches("^STOPPING=1\n", sock.next())
      sock.close()
      assert.not_matches("NOTIFY_SOCKET", log, 1, true)   -- nothing went wrong sending
    end)
  end

  it("is handed to the new sluice of a binary upgrade, which says it is the main process", function()
    local path = H.tmpdir() .. "/notify-upgrade.sock"
    local sock = notify_socket(path)
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin), "NOTIFY_SOCKET=" .. path)
    assert.are.equal(("READY=1\nSTATUS=serving 1 listener with 1 worker\nMAINPID=%d"):format(p.pid),
                     sock.next())
    H.sh("kill -USR2 " .. p.pid)
    local ready = sock.next()
    local new_pid = tonumber((ready or ""):match("^READY=1\nSTATUS=serving 1 listener with 1 worker\nMAINPID=(%d+)$"))
    assert.is_not_nil(new_pid, tostring(ready))
    finally(function() os.execute(("kill -KILL %d 2>/dev/null"):format(new_pid)) end)
    assert.are_not.equal(p.pid, new_pid)
    -- The old one drains and exits without saying the service stops.
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 30))
    assert.is_nil(sock.next(0.5))
    assert.are.equal("x", (H.exchange(port, "x", 10)))
    H.sh("kill -TERM " .. new_pid)
    assert.matches("^STOPPING=1\n", sock.next())
    sock.close()
    assert.is_truthy(H.wait_for(function()
      return select(2, H.read(p.log):gsub("%] stopped\n", "")) == 2
    end, 30), H.read(p.log))
  end)

  it("is ignored when unset, and said to be unusable when it is not a socket path", function()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(config(port, admin), "NOTIFY_SOCKET=relative/notify.sock")
    assert.are.equal("x", (H.exchange(port, "x", 10)))
    local log = H.stop_sluice(p)
    assert.matches("NOTIFY_SOCKET=relative/notify.sock: not a socket path", log, 1, true)
  end)
end)
