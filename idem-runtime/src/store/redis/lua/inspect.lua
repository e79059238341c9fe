-- inspect (an operator's). No ARGV; changes nothing. Reply: {RECORD, record, pttl, now} (`now` is
-- the server's clock, which the lease deadline is on), {ABSENT}, or {INVALID, reason} when the key
-- does not hold a valid record.
local valid, record = read_record()
if not valid then return {INVALID, 'not a record'} end
if not record then return {ABSENT} end
return {RECORD, record, redis.call('PTTL', KEYS[1]), server_now()}
