-- renew. ARGV: owner, lease. Reply: 1 renewed, 0 not the owner.
local valid, record = read_record()
if not valid or not record or state_of(record) ~= IN_FLIGHT or owner_of(record) ~= ARGV[1] then
  return 0
end
local lease = tonumber(ARGV[2])
set_keeping_ttl(string.sub(record, 1, EPOCH_LAST) .. number(server_now() + lease), lease)
return 1
