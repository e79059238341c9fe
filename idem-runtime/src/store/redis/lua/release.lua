-- release. ARGV: owner. Ends the lease now (state RELEASED); the record and its epoch stay, so the
-- next acquire takes over with the next epoch. Reply: 1 released, 0 not the owner.
local valid, record = read_record()
if not valid or not record or state_of(record) ~= IN_FLIGHT or owner_of(record) ~= ARGV[1] then
  return 0
end
set_released(record)
return 1
