-- sluice: the library a stage requires.
--   local sluice = require("sluice")
--   sluice.log.info(...), sluice.buf.alloc(n), sluice.buf.from(s), sluice.pool.stats()
return {
  log = require("sluice.log"),
  buf = require("sluice.buf"),
  pool = require("sluice.pool"),
}
