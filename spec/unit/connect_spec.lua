-- ctx:connect on the in-memory channel of sluice.testing: there is no
-- listener and no upstream there, so the stage gets an error it can act on,
-- and a bad argument raises.
local testing = require("sluice.testing")

describe("ctx:connect outside a listener", function()
  after_each(function() assert.no_leaks() end)

  it("returns nil and an error, and the connection goes on", function()
    local got = {}
    local stage = {
      channel_active = function(ctx)
        got.ok, got.err = ctx:connect("127.0.0.1:6379")
        ctx:fire_active()
      end,
    }
    local ch = testing.channel{ stage, "sluice.stages.echo" }
    assert.is_nil(got.ok)
    assert.are.equal("not a client connection", got.err)
    ch:write_inbound("still here")
    assert.outbound(ch, "still here")
    assert.is_false(ch:finish())
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
end)
