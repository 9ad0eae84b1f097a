-- The admin endpoint: /health, /metrics and /memory through the real
-- binary, with socat peers, on 127.0.0.1. Counters are compared with what
-- the spec sent; every wait is bounded, and no figure depends on timing.
local H = require("helpers")

local HOLD = "spec.fixtures.stages.hold_first"

-- Sends a raw request to the admin port; returns status, headers, body.
local function http(port, request)
  local out = H.exchange(port, request, 10)
  local status = tonumber(out:match("^HTTP/1%.1 (%d%d%d) "))
  local head, body = out:match("^(.-)\r\n\r\n(.*)$")
  return status, head or "", body or ""
end

local get = H.admin_get

local sample = H.sample

-- Sum of a per-worker sample over every worker.
local function per_worker_sum(text, name)
  local sum = 0
  for v in text:gmatch(name:gsub("_", "%%_") .. "{worker=\"%d+\"} (%d+)") do sum = sum + tonumber(v) end
  return sum
end

local held_client = H.held_client

describe("the admin endpoint", function()
  local peers = H.killed_after_each()

  local function echo_peer()
    local e = H.start_echo()
    peers[#peers + 1] = e
    return e
  end

  -- sluice with one listener "front" to a socat echo upstream, through the
  -- holding stage when hold is given (its options as Lua text), after a
  -- pass-through Lua stage when opts.pass is set.
  local function start(opts)
    opts = opts or {}
    local echo = echo_peer()
    local port, admin = H.free_port(), H.free_port()
    local pipeline = opts.hold and (("pipeline = { %s{ %q, %s } },"):format(
      opts.pass and '"spec.fixtures.config.stages.pass", ' or "", HOLD, opts.hold)) or ""
    local p = H.start_sluice(([[
return {
  workers = %d,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back", %s } },
  upstreams = { back = { servers = { "127.0.0.1:%d" } } },
}
]]):format(opts.workers or 2, admin, port, pipeline, echo.port))
    return p, port, admin
  end

  it("answers /health, and 404, 405 and 400 for what it does not serve", function()
    local p, _, admin = start()
    local status, head, body = get(admin, "/health")
    assert.are.equal(200, status)
    assert.are.equal("ok\n", body)
    assert.matches("Connection: close", head, 1, true)
    status, _, body = get(admin, "/nowhere")
    assert.are.equal(404, status)
    assert.matches("not found", body, 1, true)
    status, head = http(admin, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert.are.equal(405, status)
    assert.matches("Allow: GET", head, 1, true)
    assert.are.equal(400, (http(admin, "hello there\r\n\r\n")))
    -- A request larger than 8 KiB is refused without waiting for its end.
    assert.are.equal(400, (http(admin, "GET /metrics HTTP/1.1\r\nX: " .. ("a"):rep(9000))))
    -- The query string is ignored.
    assert.are.equal(200, (get(admin, "/health?verbose=1")))
    H.stop_sluice(p)
  end)

  it("reads requests of up to 8 KiB whole, and answers 400 to a NUL byte or another version", function()
    local p, _, admin = start({ workers = 1 })
    -- A request of exactly 8 KiB, its blank line included, is read; one
    -- byte more is not.
    local function sized(n)
      local base, blank = "GET /health HTTP/1.1\r\nX: ", "\r\n\r\n"
      return base .. ("a"):rep(n - #base - #blank) .. blank
    end
    assert.are.equal(8192, #sized(8192))
    assert.are.equal(200, (http(admin, sized(8192))))
    local status, _, body = http(admin, sized(8193))
    assert.are.equal(400, status)
    assert.are.equal("bad request: larger than 8 KiB\n", body)
    -- A NUL byte is answered at once, wherever it is (here before the
    -- blank line, which the answer does not wait for: the client only
    -- half-closes after 10 s, past the connection's own limit).
    local c = H.connect(admin)
    c.send("GET /hea\0lth HTTP/1.1\r\n")
    local answer = c.recv(#"HTTP/1.1 400 Bad Request", 20)
    c.close()
    assert.are.equal("HTTP/1.1 400 Bad Request", answer)
    status, _, body = http(admin, "GET /health HTTP/1.1\r\nX: \0\r\n\r\n")
    assert.are.equal(400, status)
    assert.are.equal("bad request: a NUL byte\n", body)
    -- HTTP/1.0 and HTTP/1.1 only, and a request line of single spaces.
    assert.are.equal(200, (http(admin, "GET /health HTTP/1.0\r\n\r\n")))
    assert.are.equal(200, (http(admin, "GET /health HTTP/1.1\n\n")))
    for _, line in ipairs({ "GET /health HTTP/1.1junk", "GET /health HTTP/1.", "GET /health HTTP/1.2",
                            "GET /health HTTP/2.0", "GET /health http/1.1", "GET /health",
                            "GET  /health HTTP/1.1", "GET /health  HTTP/1.1", " GET /health HTTP/1.1",
                            "GET /health HTTP/1.1 x", "GET health HTTP/1.1" }) do
      status, _, body = http(admin, line .. "\r\n\r\n")
      assert.are.equal(400, status, line)
      assert.are.equal("bad request\n", body, line)
    end
    H.stop_sluice(p)
  end)

  it("pauses accepting for 100 ms while out of file descriptors, and answers once some are free", function()
    local port, admin = H.free_port(), H.free_port()
    local cfg = H.tmpfile("emfile.lua", ([[
return { workers = 1, admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(admin, port))
    local p = H.spawn(("env SLUICE_ROOT=%s prlimit --nofile=64:64 %s %s -c %s"):format(
      H.shq(H.root), H.wrapper, H.shq(H.bin), H.shq(cfg)), "sluice")
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("started with", 1, true) or not H.alive(p)
    end, 30), H.read(p.log))
    -- More clients than descriptors: the worker runs out and the rest wait
    -- in the listen queue.
    local clients = {}
    for i = 1, 80 do clients[i] = H.connect(port) end
    assert.truthy(H.wait_for(function()
      return H.read(p.log):find("listener e: accept: Too many open files", 1, true)
    end, 10), H.read(p.log))
    local started = H.now()
    local c = H.connect(admin)
    c.send("GET /health HTTP/1.1\r\n\r\n")
    local pause = ("admin 127.0.0.1:%d: accept: Too many open files; pausing accepts for 100 ms")
      :format(admin)
    local function pauses()
      local n = 0
      for _ in H.read(p.log):gmatch(pause:gsub("%p", "%%%0")) do n = n + 1 end
      return n
    end
    -- (Under valgrind, which keeps descriptors of its own above the limit it
    -- shows the program, an accept past that limit takes the connection
    -- and valgrind closes it: the request is dropped after the first pause
    -- rather than kept waiting. Only the first pause and the bound count.)
    local valgrind = H.wrapper ~= ""
    assert.truthy(H.wait_for(function() return pauses() >= (valgrind and 1 or 3) end, 10),
                  H.read(p.log))
    -- One line per pause, each pause 100 ms: however slow the machine, no
    -- more lines than 100 ms periods since the request (the accept loop
    -- that spun instead logged hundreds of thousands a second).
    local n = pauses()
    assert.is_true(n <= (H.now() - started) / 0.1 + 2, ("%d lines"):format(n))
    for _, cl in ipairs(clients) do cl.close() end
    local answer = c.recv(#"HTTP/1.1 200 OK", 20)
    c.close()
    if not valgrind then assert.are.equal("HTTP/1.1 200 OK", answer) end
    H.stop_sluice(p)
  end)

  it("counts connections and bytes by listener, and upstream connects, as sent", function()
    local p, port, admin = start()
    local status, head, text = get(admin, "/metrics")
    assert.are.equal(200, status)
    assert.matches("Content-Type: text/plain; version=0.0.4", head, 1, true)
    assert.matches("# TYPE sluice_connections_total counter", text, 1, true)
    assert.are.equal(0, sample(text, "sluice_connections_total", 'listener="front"'))
    -- Three connections, 1000, 2000 and 3000 bytes, each echoed back.
    for i = 1, 3 do
      local data = ("x"):rep(1000 * i)
      local got, rc = H.exchange(port, data, 10)
      assert.are.equal(0, rc)
      assert.are.equal(#data, #got)
    end
    assert.truthy(H.wait_for(function()
      text = select(3, get(admin, "/metrics"))
      return sample(text, "sluice_connections_open", 'listener="front"') == 0
    end, 10), text)
    assert.are.equal(3, sample(text, "sluice_connections_total", 'listener="front"'))
    assert.are.equal(6000, sample(text, "sluice_received_bytes_total", 'listener="front"'))
    assert.are.equal(6000, sample(text, "sluice_sent_bytes_total", 'listener="front"'))
    assert.are.equal(3, sample(text, "sluice_upstream_connects_total", 'upstream="back"'))
    assert.are.equal(0, sample(text, "sluice_upstream_connect_failures_total", 'upstream="back"'))
    assert.are.equal(3, sample(text, "sluice_upstream_connect_seconds_count", 'upstream="back"'))
    assert.are.equal(3, sample(text, "sluice_upstream_connect_seconds_bucket",
                               'upstream="back",le="+Inf"'))
    assert.are.equal(2, sample(text, "sluice_workers"))
    assert.are.equal(2, sample(text, "sluice_workers_answering"))
    -- Nothing is held once every connection is gone.
    assert.are.equal(0, per_worker_sum(text, "sluice_pool_in_use_bytes"))
    assert.is_true(sample(text, "sluice_pool_reserved_bytes", 'arena="0"')
                   + sample(text, "sluice_pool_reserved_bytes", 'arena="1"') > 0)
    assert.is_true(per_worker_sum(text, "sluice_pool_cache_hits_total")
                   + per_worker_sum(text, "sluice_pool_cache_misses_total") > 0)
    assert.are.equal(0, per_worker_sum(text, "sluice_leaks_total"))
    H.stop_sluice(p)
  end)

  it("counts a connect failure", function()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "nobody" } },
  upstreams = { nobody = { servers = { "127.0.0.1:%d" } } },
}
]]):format(admin, port, H.free_port()))
    H.exchange(port, "x", 10)
    local text
    assert.truthy(H.wait_for(function()
      text = select(3, get(admin, "/metrics"))
      return sample(text, "sluice_upstream_connect_failures_total", 'upstream="nobody"') == 1
    end, 10), text)
    assert.are.equal(0, sample(text, "sluice_upstream_connects_total", 'upstream="nobody"'))
    H.stop_sluice(p)
  end)

  it("counts a stage error by stage, and a leak with its bytes", function()
    local p, port, admin = start({ workers = 1, hold = "leak = true" })
    -- The stage raises on "boom": its connection closes, the error is counted.
    H.exchange(port, "boom", 10)
    -- The stage keeps the first buffer and never releases it: the close
    -- reclaims it and counts a leak.
    H.exchange(port, "kept forever", 10)
    local text
    assert.truthy(H.wait_for(function()
      text = select(3, get(admin, "/metrics"))
      return sample(text, "sluice_leaks_total", 'worker="0"') == 1
    end, 10), text)
    assert.are.equal(1, sample(text, "sluice_stage_errors_total", ('stage="%s"'):format(HOLD)))
    assert.is_true(sample(text, "sluice_leaked_bytes_total", 'worker="0"') >= #"kept forever")
    assert.is_true(sample(text, "sluice_lua_memory_bytes", 'worker="0"') > 0)
    local log = H.stop_sluice(p, { leaks_expected = true })
    assert.matches("LEAK: buffer of", log, 1, true)
  end)

  it("counts what reaches the tail unconsumed: a buffer, a table and a string, all released", function()
    local port, admin = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "sink", listen = "127.0.0.1:%d",
                  pipeline = { "spec.fixtures.stages.to_tail" } } },
}
]]):format(admin, port), "SLUICE_LOG_LEVEL=debug")
    assert.are.equal("", (H.exchange(port, "hello\n", 10)))
    local _, _, text = get(admin, "/metrics")
    assert.are.equal(3, sample(text, "sluice_unhandled_inbound_total", 'worker="0"'))
    assert.are.equal(0, sample(text, "sluice_pool_buffers", 'worker="0"'))
    local log = H.stop_sluice(p)
    assert.matches("on sink: 6 inbound bytes reached the tail of the pipeline and were released",
                   log, 1, true)
    assert.matches("on sink: a table fired by stage spec.fixtures.stages.to_tail reached a C stage "
                   .. "or the tail and was dropped", log, 1, true)
    assert.matches("on sink: 8 inbound bytes reached the tail of the pipeline and were released",
                   log, 1, true)
  end)

  it("attributes a held buffer to its stage and listener in /memory, until the connection closes", function()
    -- The holding stage is the second Lua stage: the buffer reaches it by a
    -- hop between Lua stages.
    local p, port, admin = start({ workers = 1, hold = "leak = false", pass = true })
    local c = held_client(port, "held by the stage")
    local status, body
    assert.truthy(H.wait_for(function()
      status, _, body = get(admin, "/memory")
      return body:find(('stage="%s"'):format(HOLD), 1, true)
    end, 10), body)
    assert.are.equal(200, status)
    local bufs, bytes = body:match(('stage="%s" listener="front" buffers=(%%d+) bytes=(%%d+)')
      :format(HOLD:gsub("%.", "%%.")))
    assert.are.equal("1", bufs)
    assert.is_true(tonumber(bytes) >= #"held by the stage")
    local lb = body:match('listener="front" buffers=1 bytes=(%d+) connections=1')
    assert.are.equal(bytes, lb)
    assert.matches("Total pool: reserved=%d+ used=%d+", body)
    assert.matches("arena=0 reserved=%d+ used=%d+", body)
    assert.matches("worker=0 buffers=1 buffer_bytes=" .. bytes, body, 1, true)
    assert.matches("Lua heaps:\n  worker=0 bytes=%d+", body)
    c.release()
    assert.are.equal(0, c.finish())
    assert.truthy(H.wait_for(function()
      body = select(3, get(admin, "/memory"))
      return body:find('listener="front" buffers=0 bytes=0 connections=0', 1, true)
    end, 10), body)
    assert.is_nil(body:find(('stage="%s"'):format(HOLD), 1, true))
    assert.matches("worker=0 buffers=0 buffer_bytes=0", body, 1, true)
    H.stop_sluice(p)
  end)

  it("answers 503 draining on /health while stopping", function()
    local p, port, admin = start({ workers = 1 })
    local c = held_client(port, "open\n")
    assert.truthy(H.wait_for(function() return H.read(c.out) == "open\n" end, 10))
    os.execute(("kill -TERM %d"):format(p.pid))
    local status, body
    assert.truthy(H.wait_for(function()
      status, _, body = get(admin, "/health")
      return status == 503
    end, 10))
    assert.are.equal("draining\n", body)
    assert.are.equal(1, sample(select(3, get(admin, "/metrics")), "sluice_draining"))
    c.release()
    assert.are.equal(0, c.finish())
    assert.are.equal(0, H.stop(p, "TERM"))
    assert.matches("pool clean at exit", H.read(p.log), 1, true)
  end)

  it("refuses a non-loopback address without public, and a port in use", function()
    local cfg = H.tmpfile("public.lua", [[
return { admin = { listen = "0.0.0.0:9901" },
  listeners = { { name = "e", listen = "127.0.0.1:1", pipeline = { "sluice.stages.echo" } } } }
]])
    local out, rc = H.sh(("SLUICE_ROOT=%s %s --check %s 2>&1"):format(H.shq(H.root), H.shq(H.bin),
                                                                     H.shq(cfg)))
    assert.are.equal(2, rc)
    assert.matches('config error: admin.listen: expected a loopback address (127.0.0.1, [::1] or '
                   .. 'localhost) unless admin.public = true, got "0.0.0.0:9901"', out, 1, true)
    local p, _, admin = start({ workers = 1 })
    local second = H.tmpfile("second.lua", ([[
return { admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "e", listen = "127.0.0.1:%d", pipeline = { "sluice.stages.echo" } } } }
]]):format(admin, H.free_port()))
    out, rc = H.sh(("SLUICE_ROOT=%s %s -c %s 2>&1"):format(H.shq(H.root), H.shq(H.bin), H.shq(second)))
    assert.are.equal(1, rc)
    assert.matches("sluice: cannot start: admin.listen: cannot listen on 127.0.0.1:" .. admin, out, 1, true)
    H.stop_sluice(p)
  end)
end)
