-- Options of the built-in C codecs: sluice.config refuses bad ones with the
-- key path, and the C stages (through sluice.options, in-process against
-- SLUICE_CORE_LIB) refuse the same ones with the same words.
local config = require("sluice.config")
local options = require("sluice.options")

local BUILTIN = {}
for _, name in ipairs({ "sluice.stages.echo", "sluice.codec.length_field", "sluice.codec.line",
                        "sluice.codec.delimiter", "sluice.codec.fixed_length",
                        "sluice.codec.length_field_prepender" }) do
  BUILTIN[name] = true
end

-- Validates a config whose only listener has `entry` as its second stage.
local function validate(entry)
  return config.validate({
    listeners = { { name = "front", listen = "127.0.0.1:7000",
                    pipeline = { "sluice.stages.echo", entry } } },
  }, { builtin = BUILTIN })
end

local function options_of(entry)
  local o = {}
  for k, v in pairs(entry) do
    if k ~= 1 then o[k] = v end
  end
  return o
end

local PREFIX = "config error: listeners[1].pipeline[2]."

-- { entry, the message after "listeners[1].pipeline[2]." }
local BAD = {
  { { "sluice.codec.line" }, "max_length: expected a positive integer, got nil" },
  { { "sluice.codec.line", max_length = 0 }, "max_length: expected a positive integer, got 0" },
  { { "sluice.codec.line", max_length = 2.5 }, "max_length: expected a positive integer, got 2.5" },
  { { "sluice.codec.line", max_length = "1024" },
    'max_length: expected a positive integer, got "1024"' },
  { { "sluice.codec.line", max_length = 10, strip_delimiter = "no" },
    'strip_delimiter: expected true or false, got "no"' },
  { { "sluice.codec.line", max_length = 10, fail_fast = 0 },
    "fail_fast: expected true or false, got 0" },
  { { "sluice.codec.line", max_length = 10, max_len = 5 },
    "max_len: unknown key (expected one of: max_length, strip_delimiter, fail_fast)" },
  { { "sluice.codec.length_field" }, "max_frame_length: expected a positive integer, got nil" },
  { { "sluice.codec.length_field", max_frame_length = 2 ^ 31 },
    "max_frame_length: expected a positive integer, got 2147483648" },
  { { "sluice.codec.length_field", max_frame_length = 100, length_field_length = 6 },
    "length_field_length: expected 1, 2, 3, 4 or 8, got 6" },
  { { "sluice.codec.length_field", max_frame_length = 100, byte_order = "BIG" },
    'byte_order: expected "big" or "little", got "BIG"' },
  { { "sluice.codec.length_field", max_frame_length = 100, length_field_offset = -1 },
    "length_field_offset: expected an integer from 0 to 2147483647, got -1" },
  { { "sluice.codec.length_field", max_frame_length = 100, length_adjustment = 2 ^ 31 },
    "length_adjustment: expected an integer from -2147483648 to 2147483647, got 2147483648" },
  { { "sluice.codec.length_field", max_frame_length = 100, initial_bytes_to_strip = 0.5 },
    "initial_bytes_to_strip: expected an integer from 0 to 2147483647, got 0.5" },
  { { "sluice.codec.length_field", max_frame_length = 10, length_field_length = 8,
      length_field_offset = 3 },
    "length_field_offset: expected at most max_frame_length - length_field_length (2), got 3" },
  { { "sluice.codec.length_field", max_frame_length = 100, lengthFieldLength = 2 },
    "lengthFieldLength: unknown key (expected one of: max_frame_length, length_field_offset, "
    .. "length_field_length, byte_order, length_adjustment, initial_bytes_to_strip, fail_fast)" },
  { { "sluice.codec.delimiter", max_frame_length = 10 },
    "delimiters: expected a non-empty list of non-empty strings, got nil" },
  { { "sluice.codec.delimiter", delimiters = "\n", max_frame_length = 10 },
    'delimiters: expected a non-empty list of non-empty strings, got "\\n"' },
  { { "sluice.codec.delimiter", delimiters = {}, max_frame_length = 10 },
    "delimiters: expected a non-empty list of non-empty strings, got an empty table" },
  { { "sluice.codec.delimiter", delimiters = { "a", "" }, max_frame_length = 10 },
    "delimiters: expected a non-empty list of non-empty strings, got a table" },
  { { "sluice.codec.delimiter", delimiters = { "a", 1 }, max_frame_length = 10 },
    "delimiters: expected a non-empty list of non-empty strings, got a table" },
  { { "sluice.codec.delimiter", delimiters = { "a" } },
    "max_frame_length: expected a positive integer, got nil" },
  { { "sluice.codec.fixed_length", frame_length = -3 },
    "frame_length: expected a positive integer, got -3" },
  { { "sluice.codec.length_field_prepender", length_field_length = 16 },
    "length_field_length: expected 1, 2, 3, 4 or 8, got 16" },
  { { "sluice.codec.length_field_prepender", byte_order = true },
    'byte_order: expected "big" or "little", got true' },
}

local GOOD = {
  { "sluice.codec.line", max_length = 1024 },
  { "sluice.codec.line", max_length = 1, strip_delimiter = false, fail_fast = true },
  { "sluice.codec.length_field", max_frame_length = 65536, length_field_offset = 1,
    length_field_length = 3, byte_order = "little", length_adjustment = -3,
    initial_bytes_to_strip = 4, fail_fast = false },
  { "sluice.codec.length_field", max_frame_length = 8, length_field_length = 8 },
  { "sluice.codec.delimiter", delimiters = { "\r\n", "\0" }, max_frame_length = 10,
    strip_delimiter = false },
  { "sluice.codec.fixed_length", frame_length = 2 ^ 31 - 1 },
  { "sluice.codec.length_field_prepender" },
  { "sluice.codec.length_field_prepender", length_field_length = 1, byte_order = "big",
    length_adjustment = 2 },
}

describe("codec options", function()
  it("are checked by the config with the key path", function()
    for _, case in ipairs(BAD) do
      local cfg, err = validate(case[1])
      assert.is_nil(cfg)
      assert.are.equal(PREFIX .. case[2], err)
    end
  end)

  it("are refused by the C stages in the same words", function()
    for _, case in ipairs(BAD) do
      local conf, err = options.configure(case[1][1], options_of(case[1]))
      assert.is_nil(conf)
      assert.are.equal(case[2], err)
    end
  end)

  it("that are good pass both, unchanged", function()
    for _, entry in ipairs(GOOD) do
      local cfg, err = validate(entry)
      assert.is_nil(err)
      assert.are.same(options_of(entry), cfg.listeners[1].pipeline[2].options)
      assert.are.equal("c", cfg.listeners[1].pipeline[2].kind)
      local conf, cerr = options.configure(entry[1], options_of(entry))
      assert.is_nil(cerr)
      assert.is_not_nil(conf)
    end
  end)

  it("are refused for sluice.proxy_protocol, which takes none", function()
    local cfg, err = config.validate({
      listeners = { { name = "front", listen = "127.0.0.1:7000", upstream = "back",
                      pipeline = { { "sluice.proxy_protocol", trusted = { "10.0.0.1" } } } } },
      upstreams = { back = { servers = { "127.0.0.1:7001" } } },
    }, { builtin = { ["sluice.proxy_protocol"] = true } })
    assert.is_nil(cfg)
    assert.are.equal('config error: listeners[1].pipeline[1].trusted: unknown key '
                     .. '("sluice.proxy_protocol" takes no options)', err)
  end)

  it("of a C stage without options are ignored; unknown stages are named", function()
    assert.are.same({ nil, nil }, { options.configure("sluice.stages.echo", { x = 1 }) })
    assert.are.same({ nil, 'no C stage named "sluice.codec.nope"' },
                    { options.configure("sluice.codec.nope", {}) })
  end)
end)

describe("cached codec options", function()
  it("give one configuration per module and set of options", function()
    local a = options.cached("sluice.codec.line", { max_length = 10 })
    assert.are.equal(a, options.cached("sluice.codec.line", { max_length = 10 }))
    assert.are_not.equal(a, options.cached("sluice.codec.line", { max_length = 11 }))
    assert.are_not.equal(a, options.cached("sluice.codec.line", { max_length = "10" }))
    local d = options.cached("sluice.codec.delimiter", { delimiters = { "a", "b" }, max_frame_length = 3 })
    assert.are.equal(d, options.cached("sluice.codec.delimiter",
                                       { max_frame_length = 3, delimiters = { "a", "b" } }))
    assert.are.same({ nil, "max_length: expected a positive integer, got 0" },
                    { options.cached("sluice.codec.line", { max_length = 0 }) })
  end)
end)
