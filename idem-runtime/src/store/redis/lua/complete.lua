-- complete. ARGV: owner, encoded result, ttl. Reply: 1 recorded (now or by an earlier run of the
-- same call), 0 not the owner. The owner stays in the record so that a repeated call converges.
local valid, record = read_record()
if not valid or not record or owner_of(record) ~= ARGV[1] then return 0 end
local state = state_of(record)
if state == COMPLETED then return 1 end
if state ~= IN_FLIGHT then return 0 end
local value = COMPLETED .. string.sub(record, FINGERPRINT_FIRST, EPOCH_LAST) .. number(0) .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return 1
