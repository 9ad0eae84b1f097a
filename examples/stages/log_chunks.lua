-- examples.stages.log_chunks: logs the size of every chunk a client sends and
-- passes the chunk on unchanged (ownership goes with it).
local log = require("sluice.log")

return {
  channel_read = function(ctx, buf)
    log.info("%s: chunk of %d bytes", ctx:describe(), #buf)
    ctx:fire_read(buf)
  end,
}
