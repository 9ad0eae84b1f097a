-- ctx:connect on the in-memory channel of sluice.testing: there is no
-- listener and no upstream there, so the stage gets an error it can act on,
-- and a bad argument raises.
local testing = require("sluice.testing")

describe("ctx:connect outside a listener", function()
  after_each(function() assert.no_leaks() end)

  -- Connects to target in channel_active; checks that the call returned nil
  -- and want, and that the connection goes on.
  local function refused(target, want)
    local got = {}
    local stage = {
      channel_active = function(ctx)
        got.ok, got.err = ctx:connect(target)
        ctx:fire_active()
      end,
    }
    local ch = testing.channel{ stage, "sluice.stages.echo" }
    assert.is_nil(got.ok)
    assert.are.equal(want, got.err)
    ch:write_inbound("still here")
    assert.outbound(ch, "still here")
    assert.is_false(ch:finish())
  end

  it("returns nil and an error, and the connection goes on", function()
    refused("127.0.0.1:6379", "not a client connection")
  end)

  it("raises on a target that is not a string", function()
    local stage = {
      channel_active = function(ctx)
        ctx:connect(6379)
      end,
    }
    local ch = testing.channel{ stage }
    assert.is_false(ch:is_open())
    assert.matches("bad argument to connect %(string expected, got number%)", ch:close_reason() or "")
    ch:finish()
  end)

  it("refuses a target holding a NUL byte (C would read it only up to the NUL)", function()
    refused("127.0.0.1:6379\0junk",
            'expected the name of an upstream or "host:port", not a string holding a NUL byte')
  end)
end)
