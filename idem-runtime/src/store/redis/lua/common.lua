-- Shared by every script (the four transitions and the operator's three). The Rust side puts the record layout's constants (HEADER_LEN,
-- the byte ranges of each field, the state letters, the reply tags) before this file and one
-- transition after it; see `scripts.rs`. Numbers are milliseconds.

-- The Redis server's clock: one clock for every instance of the fleet.
local function server_now()
  local clock = redis.call('TIME')
  return tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end

-- Reads the record: `true, record` (`record` is false when absent), or `false` when the key holds
-- another type or a value too short to be a record.
local function read_record()
  local record = redis.pcall('GET', KEYS[1])
  if type(record) == 'table' or (record and #record < HEADER_LEN) then
    return false
  end
  return true, record
end

local function state_of(record)
  return string.sub(record, STATE, STATE)
end

local function fingerprint_of(record)
  return string.sub(record, FINGERPRINT_FIRST, FINGERPRINT_LAST)
end

local function owner_of(record)
  return string.sub(record, OWNER_FIRST, OWNER_LAST)
end

local function number(value)
  return string.format(NUMBER_FORMAT, value)
end

-- A record header: state, fingerprint, owner, epoch, lease deadline.
local function header(state, fingerprint, owner, epoch, lease_until)
  return state .. fingerprint .. owner .. number(epoch) .. number(lease_until)
end

-- Writes `value` keeping the record's remaining time to live, raised to at least `lease` so that
-- a lease never outlives its record.
local function set_keeping_ttl(value, lease)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl >= 0 and ttl < lease then
    redis.call('SET', KEYS[1], value, 'PX', lease)
  else
    redis.call('SET', KEYS[1], value, 'KEEPTTL')
  end
end

-- Ends the lease now (state RELEASED), keeping the rest of the record and its time to live: the
-- next acquire takes over with the next epoch.
local function set_released(record)
  redis.call('SET', KEYS[1], RELEASED .. string.sub(record, STATE + 1), 'KEEPTTL')
end
