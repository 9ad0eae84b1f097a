-- examples.line_rewrite: rewrites lines of a text protocol in flight.
--
--   pipeline = { { "examples.line_rewrite",
--                  rules = { { match = "^PING", replace = "PONG" },
--                            { match = "^USER (%w+)", replace = "USER guest-%1" } },
--                  max_length = 8192 } },
--
-- What the client sends is split into lines ending in "\n" or "\r\n" (a
-- decoder written with sluice.codec.decoder). Each line, without its ending,
-- is tried against the rules in order; the first rule whose `match` (a Lua
-- pattern) finds something rewrites the line with string.gsub(line, match,
-- replace), so `replace` may use %0 to %9. The line goes on with its own
-- ending. Lines no rule matches go on untouched, as slices of the bytes the
-- client sent (no copy), consecutive ones as one slice.
--
-- A line longer than max_length (default 8192) closes the connection with
-- reason "frame_too_large". A last line without an ending is not passed on.
local codec = require("sluice.codec")
local log = require("sluice.log")

local find, gsub, type = string.find, string.gsub, type

local LF, CR = 10, 13

-- The rules of one options table, checked once (a broken rule raises, which
-- closes the connection with the message as its reason).
local checked = setmetatable({}, { __mode = "k" })

local function rules_of(options)
  local rules = checked[options]
  if rules then return rules end
  rules = options.rules or {}
  if type(rules) ~= "table" then error("examples.line_rewrite: option 'rules' must be a list", 0) end
  for i, r in ipairs(rules) do
    if type(r) ~= "table" or type(r.match) ~= "string" or type(r.replace) ~= "string" then
      error(("examples.line_rewrite: rules[%d] must be { match = pattern, replace = string }")
            :format(i), 0)
    end
    local ok, err = pcall(find, "", r.match)
    if not ok then error(("examples.line_rewrite: rules[%d].match: %s"):format(i, err), 0) end
  end
  checked[options] = rules
  return rules
end

-- The rewritten line, or nil when no rule matches.
local function rewrite(rules, line)
  for i = 1, #rules do
    local r = rules[i]
    if find(line, r.match) then return (gsub(line, r.match, r.replace)) end
  end
  return nil
end

-- decode_fn for sluice.codec.decoder: `cum` belongs to the decoder, we read
-- from it. Every complete line is looked at; what goes into `out` is fired
-- to the next stage, which owns it: retained slices of cum for untouched
-- lines, strings for rewritten ones.
local function decode(ctx, cum, out)
  local rules = rules_of(ctx.options)
  local max = ctx.options.max_length or 8192
  local ri, w = cum:reader_index(), cum:writer_index()
  local i = ri -- [ri, i): untouched lines not passed on yet; cum's reader index stays at ri
  local too_long = false
  while i < w do
    local nl = cum:find(LF, i, w)
    local stop = nl or w -- the line is [i, stop), its ending [stop, nl]
    if nl and stop > i and cum:get_u8(stop - 1) == CR then stop = stop - 1 end
    if stop - i > max then
      too_long = true -- what came before it goes on, then we close
      break
    end
    if nl == nil then break end -- wait for the rest of the line
    local new = rewrite(rules, cum:tostring(i - ri, stop - i)) -- offsets from the reader index
    if new then
      local ending = cum:tostring(stop - ri, nl + 1 - stop)
      if i > ri then out[#out + 1] = cum:read_slice(i - ri):retain() end -- reader index -> i
      out[#out + 1] = new .. ending
      cum:skip(nl + 1 - i)
      ri = nl + 1
    end
    i = nl + 1
  end
  if i > ri then out[#out + 1] = cum:read_slice(i - ri):retain() end
  if too_long then
    log.warn("%s: line longer than %d bytes", ctx:describe(), max)
    cum:skip(w - i)
    ctx:close("frame_too_large")
  end
end

local stage = codec.decoder(decode)

-- At `sluice --check` and start-up: a broken rule or an unknown key stops
-- the config instead of failing every connection.
function stage.check_options(options)
  return codec.check_options(options, {
    max_length = codec.positive_integer,
    rules = function(rules)
      local ok, err = pcall(rules_of, { rules = rules })
      if not ok then return "a list of { match = pattern, replace = string } (" .. err .. ")" end
    end,
  })
end

return stage
