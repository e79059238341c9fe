-- purge (an operator's). No ARGV. Deletes the record unless it is in flight, whatever its lease
-- (deleting it would let a duplicate run beside a live owner, or reuse a stalled owner's epoch:
-- release_stale it first). A value that is not a valid record is deleted too: it would fail every
-- request for the key. Reply: {PURGED}, {ABSENT}, or {IN_FLIGHT_REPLY} (left alone).
local valid, record = read_record()
if valid and not record then return {ABSENT} end
if valid and state_of(record) == IN_FLIGHT then return {IN_FLIGHT_REPLY} end
redis.call('DEL', KEYS[1])
return {PURGED}
