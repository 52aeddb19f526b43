"""The Redis scripts of `moa.state.redis`: each check-and-change is one atomic script.

Every key a script touches shares one hash tag (`{moa:...}`), so each script runs on one slot
of a Redis Cluster. Time is the server's (`TIME`), so replicas' clocks never disagree. Money is
counted in integer nano-dollars. Reservations and slots are sorted sets scored by their expiry
(ms); every script first drops the expired ones, so a crashed replica's hold ends by itself.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function int(x) return string.format('%d', x) end
-- Remove the members of zset `zkey` scored up to `upto` and their "a b" entries in hash
-- `hkey`; return how many, and the sums of their a and b.
local function drop(zkey, hkey, upto)
  local n, sa, sb = 0, 0, 0
  while true do
    local ids = redis.call('ZRANGEBYSCORE', zkey, '-inf', upto, 'LIMIT', 0, 200)
    if #ids == 0 then return n, sa, sb end
    for _, e in ipairs(redis.call('HMGET', hkey, unpack(ids))) do
      if e then
        local sp = string.find(e, ' ')
        sa = sa + tonumber(string.sub(e, 1, sp - 1))
        sb = sb + tonumber(string.sub(e, sp + 1))
      end
    end
    redis.call('ZREM', zkey, unpack(ids))
    redis.call('HDEL', hkey, unpack(ids))
    n = n + #ids
  end
end
"""

# KEYS: ledger hash, reservations zset (id -> expiry), amounts hash (id -> "nusd tokens")
_LEDGER = _NOW + """
local function purge()
  local n, usd, tokens = drop(KEYS[2], KEYS[3], now)
  if n == 0 then return end
  redis.call('HINCRBY', KEYS[1], 'reserved_nusd', int(-usd))
  redis.call('HINCRBY', KEYS[1], 'reserved_tokens', int(-tokens))
  redis.call('HINCRBY', KEYS[1], 'expired', n)
end
local function keep(ms)
  if tonumber(ms) > 0 then
    for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, ms) end
  end
end
local function totals()
  return redis.call('HMGET', KEYS[1], 'spent_nusd', 'spent_tokens', 'reserved_nusd',
    'reserved_tokens', 'calls', 'refused', 'unpriced', 'expired')
end
local function num(v) return tonumber(v or 0) or 0 end
purge()
"""

RESERVE = _LEDGER + """
-- ARGV: limit_nusd ('' = none), limit_tokens ('' = none), nusd, tokens, id, ttl_ms, keep_ms
local f = totals()
local over = ''
if ARGV[2] ~= '' and num(f[2]) + num(f[4]) + tonumber(ARGV[4]) > tonumber(ARGV[2]) then
  over = 'tokens'
elseif ARGV[1] ~= '' and num(f[1]) + num(f[3]) + tonumber(ARGV[3]) > tonumber(ARGV[1]) then
  over = 'usd'
end
if over ~= '' then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
else
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[3] .. ' ' .. ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'reserved_nusd', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'reserved_tokens', ARGV[4])
end
keep(ARGV[7])
local out = totals()
table.insert(out, 1, over)
return out
"""

SETTLE = _LEDGER + """
-- ARGV: id ('' = none), nusd, tokens, counted (0/1), unpriced (0/1), keep_ms
if ARGV[1] ~= '' then
  local a = redis.call('HGET', KEYS[3], ARGV[1])
  if a then
    local sp = string.find(a, ' ')
    redis.call('HINCRBY', KEYS[1], 'reserved_nusd', int(-tonumber(string.sub(a, 1, sp - 1))))
    redis.call('HINCRBY', KEYS[1], 'reserved_tokens', int(-tonumber(string.sub(a, sp + 1))))
    redis.call('HDEL', KEYS[3], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
end
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], 'spent_nusd', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'spent_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'calls', 1)
  redis.call('HINCRBY', KEYS[1], 'unpriced', ARGV[5])
end
keep(ARGV[6])
return totals()
"""

READ = _LEDGER + """
return totals()
"""

# KEYS: rate log zset (id -> ms), rate weights hash (id -> "requests tokens", '#r' / '#t' sums),
# provider slots zset (id -> expiry ms), model slots zset: one provider's hash tag.
ADMIT = _NOW + """
-- ARGV: window_ms, rpm, tpm, requests, tokens, id, provider_cap, model_cap, ttl_ms (0 = none)
-- Returns 0 (admitted: counted and holding its slots), ms to wait for the window, or -1 (full).
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local caps = {tonumber(ARGV[7]), tonumber(ARGV[8])}
if rpm > 0 or tpm > 0 then
  local n, dr, dk = drop(KEYS[1], KEYS[2], now - window)
  if n > 0 then
    redis.call('HINCRBY', KEYS[2], '#r', int(-dr))
    redis.call('HINCRBY', KEYS[2], '#t', int(-dk))
  end
  local sums = redis.call('HMGET', KEYS[2], '#r', '#t')
  local r, k = tonumber(sums[1] or 0) or 0, tonumber(sums[2] or 0) or 0
  if r > 0 and ((rpm > 0 and r + tonumber(ARGV[4]) > rpm) or
                (tpm > 0 and k + tonumber(ARGV[5]) > tpm)) then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return int(math.max(1, tonumber(first[2]) + window - now))
  end
end
for i = 1, 2 do
  if caps[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 + i], '-inf', now)
    if redis.call('ZCARD', KEYS[2 + i]) >= caps[i] then return -1 end
  end
end
if rpm > 0 or tpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[6])
  redis.call('HSET', KEYS[2], ARGV[6], ARGV[4] .. ' ' .. ARGV[5])
  redis.call('HINCRBY', KEYS[2], '#r', ARGV[4])
  redis.call('HINCRBY', KEYS[2], '#t', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], int(window * 2))
  redis.call('PEXPIRE', KEYS[2], int(window * 2))
end
local ttl = tonumber(ARGV[9])
for i = 1, 2 do
  if caps[i] > 0 then
    redis.call('ZADD', KEYS[2 + i], now + ttl, ARGV[6])
    redis.call('PEXPIRE', KEYS[2 + i], int(ttl * 4))
  end
end
return 0
"""

RELEASE = """
-- KEYS: as ADMIT; ARGV: id, tokens ('' = keep the estimate)
local function int(x) return string.format('%d', x) end
if ARGV[2] ~= '' then
  local a = redis.call('HGET', KEYS[2], ARGV[1])
  if a then
    local sp = string.find(a, ' ')
    local old = tonumber(string.sub(a, sp + 1))
    redis.call('HSET', KEYS[2], ARGV[1], string.sub(a, 1, sp - 1) .. ' ' .. ARGV[2])
    redis.call('HINCRBY', KEYS[2], '#t', int(tonumber(ARGV[2]) - old))
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# KEYS: a zset of leases (reservations or slots); ARGV: ttl_ms, ids...
REFRESH = _NOW + """
local n = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
    n = n + 1
  end
end
if n > 0 and redis.call('PTTL', KEYS[1]) > 0 then
  redis.call('PEXPIRE', KEYS[1], int(math.max(redis.call('PTTL', KEYS[1]), tonumber(ARGV[1]) * 4)))
end
return n
"""
