-- release_stale (an operator's). ARGV: owner, lease deadline, both as inspected. Releases the
-- record as release does, but only if it is still in flight under that owner and that lease
-- deadline: an owner that renewed since (alive) keeps it. Reply: 1 released (now, or already
-- released from that owner: a repeated call converges), 0 refused.
local valid, record = read_record()
if not valid or not record or owner_of(record) ~= ARGV[1] then return 0 end
local state = state_of(record)
if state == RELEASED then return 1 end
if state ~= IN_FLIGHT then return 0 end
if tonumber(string.sub(record, LEASE_FIRST, LEASE_LAST)) ~= tonumber(ARGV[2]) then return 0 end
set_released(record)
return 1
