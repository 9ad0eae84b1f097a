-- HTTP through sluice to a real nginx, with wrk as the client: a few seconds
-- of keep-alive load, pass-through and with a Lua stage, and no socket
-- error, no bad status, every request answered.
local H = require("spec.helpers")

local function config(port, upstream_port, pipeline)
  return ([[
return {
  workers = 2,
  listeners = {
    { name = "web", listen = "127.0.0.1:%d", upstream = "origin", pipeline = %s },
  },
  upstreams = { origin = { servers = { "127.0.0.1:%d" } } },
}
]]):format(port, pipeline, upstream_port)
end

describe("HTTP through sluice", function()
  local nginx
  setup(function() nginx = H.start_nginx() end)
  teardown(function() if nginx then H.stop(nginx) end end)

  for _, pipeline in ipairs({ "{}", '{ "bench.proxy.field_stage" }' }) do
    it("serves wrk's keep-alive load from nginx without a socket error, pipeline " .. pipeline,
      function()
        local port = H.free_port()
        local p = H.start_sluice(config(port, nginx.port, pipeline))
        local out, rc = H.sh(("timeout 30 wrk -t 2 -c 16 -d 3s --latency http://127.0.0.1:%d/ 2>&1")
          :format(port))
        assert.are.equal(0, rc, out)
        local requests = tonumber(out:match("(%d+) requests in"))
        assert.is_truthy(requests and requests > 100, out)
        assert.is_nil(out:find("Socket errors", 1, true), out)
        assert.is_nil(out:find("Non%-2xx"), out)
        local log = H.stop_sluice(p)
        assert.not_matches("stage .* raised", log)
      end)
  end
end)
