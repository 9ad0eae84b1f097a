-- RESP for tests and benchmarks: resp.command("SET", "k", "v") is the array
-- of bulk strings a client sends (redis-cli, redis-benchmark).
local M = {}

function M.command(...)
  local parts = { "*" .. select("#", ...) .. "\r\n" }
  for i = 1, select("#", ...) do
    local a = tostring((select(i, ...)))
    parts[#parts + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return table.concat(parts)
end

return M
