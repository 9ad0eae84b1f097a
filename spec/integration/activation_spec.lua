-- systemd's socket activation (LISTEN_FDS, sd_listen_fds(3)): the real
-- systemd-socket-activate opens the listening sockets, waits for the first
-- connection and execs sluice with them (its pid stays: LISTEN_PID is
-- sluice's). sluice takes each by its address, its workers share it,
-- reloads and SIGUSR2 upgrades keep it. 127.0.0.1 only, every wait bounded;
-- a new sluice of an upgrade is found by the pid the old one logs.
local H = require("helpers")

local ACTIVATE = "/usr/bin/systemd-socket-activate"

local function count(s, pattern, plain)
  local n, at = 0, 1
  while true do
    local i, j = s:find(pattern, at, plain)
    if not i then return n end
    n, at = n + 1, j + 1
  end
end

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

-- Starts sluice on config_text under systemd-socket-activate, which
-- listens on 127.0.0.1:port for each of sockets ({ name, port }, in
-- order: descriptors 3, 4, ...; opts.datagram: UDP). Returns the process
-- (its pid is sluice's once it execs) once the sockets listen: sluice
-- itself starts at the first connection.
local function activate(config_text, sockets, opts)
  local cfg = H.tmpfile("sluice.lua", config_text)
  local args, names = {}, {}
  for _, s in ipairs(sockets) do
    args[#args + 1] = "-l 127.0.0.1:" .. s.port
    names[#names + 1] = s.name
  end
  local p = H.spawn(("%s %s %s --fdname=%s env SLUICE_ROOT=%s %s %s -c %s"):format(
    ACTIVATE, opts and opts.datagram and "-d" or "", table.concat(args, " "),
    table.concat(names, ":"), H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg)), "activated")
  local last = sockets[#sockets].port
  assert(H.wait_for(function()
    return H.read(p.log):find("Listening on 127.0.0.1:" .. last, 1, true) or not H.alive(p)
  end, 30), "systemd-socket-activate did not listen:\n" .. H.read(p.log))
  p.config = cfg
  return p
end

local function started(p)
  assert(H.wait_for(function()
    return H.read(p.log):find("started with", 1, true) or not H.alive(p)
  end, 60) and H.alive(p), "sluice did not start:\n" .. H.read(p.log))
end

-- The first connection, which starts sluice: byte comes back once it has
-- started (however long that takes under valgrind).
local function first_through(p, port, byte)
  local first = H.connect(port)
  first.send(byte)
  started(p)
  assert.are.equal(byte, first.recv(1, 30))
  first.close()
end

-- One connection through 127.0.0.1:port: true when byte came back.
local function echo_once(port, byte)
  local ok, c = pcall(H.connect, port)
  if not ok then return false end
  local sent = pcall(c.send, byte)
  local got = sent and c.recv(1, 10)
  c.close()
  return got == byte
end

local function config(ports, upstream, extra, workers)
  return ([[
return {
  workers = %d,
  admin = { listen = "127.0.0.1:%d" },
  upstreams = { back = { servers = { "127.0.0.1:%d" }, connect_timeout_ms = 2000 } },
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", upstream = "back" },%s
  },
}
]]):format(workers or 2, ports.admin, upstream, ports.front, extra or "")
end

describe("socket activation", function()
  local peers = H.killed_after_each()

  it("serves on systemd's sockets: the queued first connection, shared by the workers, across a reload and an upgrade",
     function()
    local echo = H.start_echo()
    peers[#peers + 1] = echo
    local ports = { front = H.free_port(), admin = H.free_port(), extra = H.free_port(),
                    added = H.free_port() }
    local p = activate(config(ports, echo.port), {
      { name = "front", port = ports.front }, { name = "admin", port = ports.admin },
      { name = "extra", port = ports.extra } })
    local new_pid
    finally(function()
      if new_pid then os.execute(("kill -KILL %d 2>/dev/null"):format(new_pid)) end
    end)
    -- The first connection, before sluice runs: it waits in systemd's
    -- queue, starts sluice, and is served.
    assert.is_nil(H.read(p.log):find("started with", 1, true))
    local first = H.connect(ports.front)
    first.send("q")
    started(p)
    assert.are.equal("q", first.recv(1, 30))
    first.close()
    local log = H.read(p.log)
    assert.matches("Communication attempt on fd 3", log, 1, true)
    assert.matches(("listener front on 127.0.0.1:%d -> back (0 stages), on the socket systemd "
                    .. "passed (LISTEN_FDS), which the workers share"):format(ports.front), log, 1, true)
    assert.matches(('LISTEN_FDS: the socket systemd passed as descriptor 5 ("extra"), on '
                    .. "127.0.0.1:%d, is on no listener's address nor admin.listen: closed here")
                   :format(ports.extra), log, 1, true)
    assert.matches("started with 2 workers", log, 1, true)
    -- The admin endpoint answers on its socket from systemd too.
    for i = 1, 20 do assert.is_true(echo_once(ports.front, string.char(96 + i))) end
    assert.are.equal(21, H.metric(ports.admin, "sluice_connections_total", 'listener="front"'))

    -- A reload adds a listener (bound by sluice) and keeps systemd's socket.
    write(p.config, config(ports, echo.port, ('\n    { name = "added", listen = "127.0.0.1:%d", '
      .. 'pipeline = { "sluice.stages.echo" } },'):format(ports.added)))
    os.execute(("kill -HUP %d"):format(p.pid))
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("SIGHUP: configuration reloaded", 1, true)
    end, 30), H.read(p.log))
    assert.matches("(1 kept, 1 added, 0 removed)", H.read(p.log), 1, true)
    assert.is_true(echo_once(ports.front, "r"))
    assert.is_true(echo_once(ports.added, "a"))

    -- SIGUSR2: the new sluice takes systemd's socket from the old one;
    -- connections all along. Its workers share that socket too: their
    -- number may change (the listener "added", on sockets of sluice's own
    -- per worker, goes).
    write(p.config, config(ports, echo.port, nil, 3))
    os.execute(("kill -USR2 %d"):format(p.pid))
    local ok, failed, after = 0, 0, 0
    local deadline = H.now() + 60
    while after < 20 and H.now() < deadline do
      if echo_once(ports.front, "u") then ok = ok + 1 else failed = failed + 1 end
      if H.read(p.log):find("SIGTERM from the new sluice", 1, true) then after = after + 1 end
    end
    log = H.read(p.log)
    assert.are.equal(20, after, "no take-over:\n" .. log)
    assert.are.equal(0, failed, ("%d of %d connections failed:\n%s"):format(failed, ok + failed, log))
    new_pid = tonumber(log:match("SIGUSR2: started a new sluice %(pid (%d+)%)"))
    assert.is_not_nil(new_pid)
    assert.are.equal(2, count(log, "on the socket systemd passed (LISTEN_FDS), which the workers share", true))
    assert.matches(("started with 3 workers, pooled allocator (config %s, pid %d)"):format(p.config, new_pid),
                   log, 1, true)
    assert.matches("upgrade: 2 inherited listening sockets on addresses this configuration does "
                   .. "not listen on: closed", log, 1, true)
    -- The old one (the process systemd-socket-activate became) exits 0.
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 30))
    assert.is_true(echo_once(ports.front, "n"))
    assert.is_false(H.port_open(ports.added))
    -- The admin endpoint is the new one's (systemd's socket, passed on).
    assert.is_nil(H.metric(ports.admin, "sluice_connections_total", 'listener="added"'))
    assert.is_truthy(H.metric(ports.admin, "sluice_connections_total", 'listener="front"'))

    os.execute(("kill -TERM %d"):format(new_pid))
    assert.is_truthy(H.wait_for(function()
      return count(H.read(p.log), "%] stopped\n") == 2
    end, 30), "the new sluice did not stop:\n" .. H.read(p.log))
    new_pid = nil
    log = H.read(p.log)
    assert.are.equal(5, count(log, "worker %d: pool clean at exit"))
    assert.is_nil(log:find("LEAK", 1, true))
    assert.is_nil(log:find("[error]", 1, true))
    assert.is_nil(log:find("==%d+== "))   -- under valgrind: nothing from the new sluice either
  end)

  it("passes no listening socket on to what its Lua starts, from the configuration's first line on",
     function()
    -- What os.execute starts while the configuration loads (a secret read
    -- through a command, a helper started), in the sluice systemd started
    -- and in the new sluice of an upgrade, and what a stage starts: none
    -- holds a listening socket, which would otherwise outlive sluice.
    local ports = { front = H.free_port(), admin = H.free_port() }
    local at_load, in_stage = H.tmpfile("at_load.txt", ""), H.tmpfile("in_stage.txt", "")
    local text = ([[
os.execute("ls -l /proc/$$/fd >> %s 2>&1; echo -- >> %s")
return {
  workers = 2,
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "front", listen = "127.0.0.1:%d",
      pipeline = { { "spec.fixtures.stages.lists_fds", out = %q }, "sluice.stages.echo" } },
  },
}
]]):format(at_load, at_load, ports.admin, ports.front, in_stage)
    local p = activate(text, { { name = "front", port = ports.front },
                               { name = "admin", port = ports.admin } })
    local new_pid
    finally(function()
      if new_pid then os.execute(("kill -KILL %d 2>/dev/null"):format(new_pid)) end
    end)
    first_through(p, ports.front, "a")
    os.execute(("kill -USR2 %d"):format(p.pid))
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 60),
                     H.read(p.log))
    new_pid = tonumber(H.read(p.log):match("SIGUSR2: started a new sluice %(pid (%d+)%)"))
    assert.is_true(echo_once(ports.front, "b"))
    os.execute(("kill -TERM %d"):format(new_pid))
    assert.is_truthy(H.wait_for(function()
      return count(H.read(p.log), "%] stopped\n") == 2
    end, 30), "the new sluice did not stop:\n" .. H.read(p.log))
    new_pid = nil
    assert.are.equal(4, count(H.read(p.log), "worker %d: pool clean at exit"))
    assert.is_nil(H.read(p.log):find("==%d+== "))   -- valgrind: nothing from either sluice
    local loads, stages = H.read(at_load), H.read(in_stage)
    assert.are.equal(2, count(loads, "--\n", true), loads)
    assert.are.equal(2, count(stages, "--\n", true), stages)
    assert.is_nil(loads:find("socket:", 1, true), loads)
    assert.is_nil(stages:find("socket:", 1, true), stages)
  end)

  it("leaves the connections that come while it stops in systemd's queue, for the next sluice",
     function()
    -- systemd keeps its sockets across the service's restarts: here a
    -- shell that systemd-socket-activate starts plays that part, holding
    -- the socket while it runs sluice twice (LISTEN_PID=$$ of the shell
    -- that execs it), the second time once told to.
    local port = H.free_port()
    local go = H.tmpdir() .. "/go"
    local cfg = H.tmpfile("sluice.lua", ([[
return {
  workers = 2,
  listeners = { { name = "front", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } },
}
]]):format(port))
    local run = ("sh -c 'LISTEN_PID=$$ exec env SLUICE_ROOT=%s %s %s -c %s'"):format(
      H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg))
    local holder = ("%s; echo \"run 1 exited $?\"; i=0; while [ ! -e %s ] && [ $i -lt 600 ]; "
                    .. "do sleep 0.1; i=$((i+1)); done; %s"):format(run, H.shq(go), run)
    local p = H.spawn(("%s -l 127.0.0.1:%d --fdname=front sh -c %s"):format(ACTIVATE, port,
                                                                           H.shq(holder)), "held")
    assert(H.wait_for(function()
      return H.read(p.log):find("Listening on 127.0.0.1:" .. port, 1, true) or not H.alive(p)
    end, 30), "systemd-socket-activate did not listen:\n" .. H.read(p.log))
    local pids = {}
    finally(function()
      for _, pid in ipairs(pids) do os.execute(("kill -KILL %d 2>/dev/null"):format(pid)) end
    end)
    local function started_run(n)
      assert(H.wait_for(function()
        return count(H.read(p.log), "started with 2 workers") >= n or not H.alive(p)
      end, 60), "sluice did not start:\n" .. H.read(p.log))
      local pid
      for found in H.read(p.log):gmatch("started with 2 workers[^\n]*pid (%d+)%)") do pid = found end
      pids[n] = tonumber(pid)
    end
    local first = H.connect(port)
    first.send("a")
    started_run(1)
    assert.are.equal("a", first.recv(1, 30))
    first.close()
    -- A connection open while the first sluice drains, and one that comes
    -- meanwhile: no worker accepts it, it waits in the socket's queue.
    local open = H.connect(port)
    open.send("o")
    assert.are.equal("o", open.recv(1, 30))
    -- The socket, as the holder has it, and whether the first sluice
    -- still has a descriptor of it (a worker that could accept).
    local socket = H.sh(("readlink /proc/%d/fd/3"):format(p.pid)):match("socket:%[%d+%]")
    assert.is_not_nil(socket)
    local function holds(pid)
      local out = H.sh(("ls -l /proc/%d/fd 2>/dev/null"):format(pid))
      return out:find(socket, 1, true) ~= nil
    end
    assert.is_true(holds(pids[1]))
    os.execute(("kill -TERM %d"):format(pids[1]))
    assert.is_truthy(H.wait_for(function() return not holds(pids[1]) end, 30), H.read(p.log))
    assert.matches("SIGTERM: stopping", H.read(p.log), 1, true)
    local queued = H.connect(port)
    queued.send("q")
    open.close()
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("run 1 exited 0", 1, true)
    end, 30), H.read(p.log))
    -- Nothing of the first sluice is left: the queued connection is the
    -- second one's, which starts on the same socket.
    H.sh("touch " .. H.shq(go))
    started_run(2)
    assert.are.equal("q", queued.recv(1, 30), H.read(p.log))
    queued.close()
    assert.is_true(echo_once(port, "b"))
    os.execute(("kill -TERM %d"):format(pids[2]))
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 30),
                     H.read(p.log))
    pids = {}
    local log = H.read(p.log)
    assert.are.equal(4, count(log, "worker %d: pool clean at exit"))
    assert.is_nil(log:find("[error]", 1, true))
    assert.is_nil(log:find("==%d+== "))
  end)

  it("warns of systemd's sockets a new sluice of an upgrade does not listen on, as a start does",
     function()
    local ports = { front = H.free_port(), old = H.free_port(), admin = H.free_port() }
    local function text(with_old)
      return ([[
return {
  workers = 2,%s
  listeners = {
    { name = "front", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },%s
  },
}
]]):format(with_old and ("\n  admin = { listen = \"127.0.0.1:%d\" },"):format(ports.admin) or "",
           ports.front, with_old and ("\n    { name = \"old\", listen = \"127.0.0.1:%d\", "
             .. "pipeline = { \"sluice.stages.echo\" } },"):format(ports.old) or "")
    end
    local p = activate(text(true), { { name = "front", port = ports.front },
                                     { name = "old", port = ports.old },
                                     { name = "admin", port = ports.admin } })
    local new_pid
    finally(function()
      if new_pid then os.execute(("kill -KILL %d 2>/dev/null"):format(new_pid)) end
    end)
    first_through(p, ports.front, "a")
    -- The new sluice has neither the listener "old" nor the admin
    -- endpoint: systemd's sockets there keep listening in systemd, with
    -- no one to accept (here systemd-socket-activate holds none: they
    -- close with the old sluice).
    write(p.config, text(false))
    os.execute(("kill -USR2 %d"):format(p.pid))
    assert.are.equal(0, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 60),
                     H.read(p.log))
    local log = H.read(p.log)
    new_pid = tonumber(log:match("SIGUSR2: started a new sluice %(pid (%d+)%)"))
    assert.is_true(echo_once(ports.front, "b"))
    for _, port in ipairs({ ports.old, ports.admin }) do
      local said = false
      for line in log:gmatch("[^\n]+") do
        said = said or (line:find("[warn] upgrade: a socket systemd passed (descriptor ", 1, true)
          and line:find(("here), on 127.0.0.1:%d, is on no listener's address nor admin.listen: "
                         .. "closed here (systemd keeps it listening: connections to it wait "
                         .. "until a sluice listens there)"):format(port), 1, true)) ~= nil
      end
      assert.is_true(said, log)
    end
    assert.is_nil(log:find("inherited listening socket", 1, true), log)
    os.execute(("kill -TERM %d"):format(new_pid))
    assert.is_truthy(H.wait_for(function()
      return count(H.read(p.log), "%] stopped\n") == 2
    end, 30), "the new sluice did not stop:\n" .. H.read(p.log))
    new_pid = nil
    assert.are.equal(4, count(H.read(p.log), "worker %d: pool clean at exit"))
    assert.is_nil(H.read(p.log):find("==%d+== "))
  end)

  it("keeps systemd's socket listening for the other workers while one is stuck in Lua", function()
    if H.wrapper ~= "" then
      pending("not under valgrind: the spinning worker starves the other one there")
      return
    end
    local ports = { steady = H.free_port(), spin = H.free_port() }
    local p = activate(([[
return {
  workers = 2, lua_timeout_ms = 200, drain_timeout_ms = 0,
  listeners = {
    { name = "steady", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } },
    { name = "spin", listen = "127.0.0.1:%d", pipeline = { "spec.fixtures.stages.spins_on_read" } },
  },
}
]]):format(ports.steady, ports.spin), { { name = "steady", port = ports.steady } })
    local first = H.connect(ports.steady)
    first.send("f")
    started(p)
    assert.are.equal("f", first.recv(1, 30))
    first.close()
    local spinner = H.connect(ports.spin)
    spinner.send("x")
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("did not stop when interrupted", 1, true)
    end, 60), H.read(p.log))
    -- A shutdown of the stuck worker's descriptor would take systemd's
    -- socket from every worker: the other one serves every connection.
    local answered = 0
    for i = 1, 10 do
      if echo_once(ports.steady, tostring(i % 10)) then answered = answered + 1 end
    end
    assert.are.equal(10, answered, H.read(p.log))
    spinner.close()
    assert.are.equal(3, H.stop(p, "TERM", 60))   -- the stuck worker never returns
  end)

  it("refuses malformed LISTEN_ variables and sockets it cannot serve on (exit 2)", function()
    local port = H.free_port()
    local cfg = H.tmpfile("sluice.lua", ([[
return { listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port))
    -- sh's pid is sluice's after exec: LISTEN_PID=$$ is for it.
    local function run(env, redirect)
      return H.sh(("timeout -s KILL 60 sh -c %s 2>&1"):format(H.shq(("%s exec env %s SLUICE_ROOT=%s %s %s -c %s"):format(
        redirect or "", env, H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg)))))
    end
    local cases = {
      { 'LISTEN_PID=$$ LISTEN_FDS=two',
        "sluice: LISTEN_FDS=two: expected the number of listening sockets passed from descriptor 3 on (sd_listen_fds(3))" },
      { 'LISTEN_PID=me LISTEN_FDS=1',
        "sluice: LISTEN_PID=me: expected the process id the sockets of LISTEN_FDS are for" },
      { 'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=one',
        "sluice: LISTEN_FDNAMES=one: 1 name for the 2 sockets of LISTEN_FDS" },
      { 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web',
        'sluice: LISTEN_FDS: descriptor 3 ("web") is not a socket: sluice takes listening TCP sockets only',
        "exec 3</dev/null;" },
      { 'LISTEN_PID=$$ LISTEN_FDS=1', "sluice: LISTEN_FDS: descriptor 3 is not open", "exec 3<&-;" },
    }
    for _, case in ipairs(cases) do
      local out, rc = run(case[1], case[3])
      assert.are.equal(2, rc, out)
      assert.matches(case[2], out, 1, true)
      assert.is_nil(out:find("started with", 1, true))
    end

    -- A UDP socket (ListenDatagram=): refused once it has started sluice.
    local p = activate(H.read(cfg), { { name = "dgram", port = port } }, { datagram = true })
    H.sh(("echo x | socat -u - UDP:127.0.0.1:%d"):format(port))
    assert.are.equal(2, H.wait_for(function() return tonumber(H.read(p.rc_file)) end, 30),
                     H.read(p.log))
    assert.matches('LISTEN_FDS: descriptor 3 ("dgram") is a datagram (UDP) socket', H.read(p.log), 1, true)

    -- A listener on another address with systemd's port cannot bind while
    -- systemd's socket listens: the error says which socket holds it (the
    -- listener's 0.0.0.0 is never bound; systemd's socket is 127.0.0.1's).
    local wide = activate(([[
return { workers = 2, listeners = { { name = "wide", listen = "0.0.0.0:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(port), { { name = "front", port = port } })
    pcall(H.connect, port)
    assert.are.equal(1, H.wait_for(function() return tonumber(H.read(wide.rc_file)) end, 30),
                     H.read(wide.log))
    assert.matches(("sluice: cannot start: listeners[1] (wide): cannot listen on 0.0.0.0:%d: Address "
                    .. 'already in use (the socket systemd passed on 127.0.0.1:%d, descriptor 3 "front", '
                    .. "holds this port: a listener takes it when its listen is that same address)")
                   :format(port, port), H.read(wide.log), 1, true)

    -- Another process's sockets are not taken: sluice binds its own.
    local q = H.start_sluice(H.read(cfg), "LISTEN_PID=1 LISTEN_FDS=1")
    assert.is_true(echo_once(port, "o"))
    local log = H.stop_sluice(q)
    assert.matches("LISTEN_FDS=1 is for pid 1, not this process (pid " .. q.pid .. "): ignored", log, 1, true)
  end)
end)
