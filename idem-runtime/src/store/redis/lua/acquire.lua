-- acquire. ARGV: fingerprint, owner, lease, in-flight ttl (>= lease).
-- Reply: {EXECUTE, epoch}, {COMPLETED_REPLY, record, pttl}, {MISMATCH}, {IN_FLIGHT_REPLY, lease_left},
-- or {INVALID, reason} when the key does not hold a valid record.
local valid, record = read_record()
if not valid then return {INVALID, 'not a record'} end
local fingerprint, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
if not record then
  redis.call('SET', KEYS[1], header(IN_FLIGHT, fingerprint, owner, 1, server_now() + lease), 'PX', ARGV[4])
  return {EXECUTE, 1}
end
if fingerprint_of(record) ~= fingerprint then return {MISMATCH} end
local state = state_of(record)
if state == COMPLETED then return {COMPLETED_REPLY, record, redis.call('PTTL', KEYS[1])} end
if state ~= IN_FLIGHT and state ~= RELEASED then return {INVALID, 'unknown state'} end
local epoch = tonumber(string.sub(record, EPOCH_FIRST, EPOCH_LAST))
local lease_until = tonumber(string.sub(record, LEASE_FIRST, LEASE_LAST))
if not epoch or not lease_until or epoch < 1 then return {INVALID, 'malformed in-flight record'} end
-- The same owner again: a retried command converges.
if state == IN_FLIGHT and owner_of(record) == owner then return {EXECUTE, epoch} end
local now = server_now()
if state == IN_FLIGHT and lease_until > now then return {IN_FLIGHT_REPLY, lease_until - now} end
-- Released, or the owner's lease expired: take over with the next epoch.
epoch = epoch + 1
set_keeping_ttl(header(IN_FLIGHT, fingerprint, owner, epoch, now + lease), lease)
return {EXECUTE, epoch}
