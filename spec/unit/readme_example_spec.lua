-- The README's tour, step 5, as written there.
local testing = require("sluice.testing")

describe("upper", function()
  it("upper-cases what the client sends", function()
    local ch = testing.channel{ "examples.stages.upper", "sluice.stages.echo" }
    ch:write_inbound("hello\n")
    assert.outbound(ch, "HELLO\n")
    assert.is_false(ch:finish())   -- raises with the leak report on a leak
  end)
end)
