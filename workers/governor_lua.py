"""The governor's algorithm as Redis Lua scripts: ``governor_rules`` line for line, so every
worker of the fleet shares one state atomically (one script call is one decision).

KEYS[1] is the teacher's state hash, KEYS[2] (leases only) the hash of slot holders, each
``held:wanted:expires_ms``. Times come from Redis's own clock, unless the caller passes one as
the last argument (milliseconds; tests step it as they step the Python governor's); floats
travel back as strings (Redis truncates Lua numbers to integers).
"""

from __future__ import annotations

__all__ = ["ACQUIRE_LUA", "LEASE_LUA", "OBSERVE_LUA", "OVERLOAD_LUA", "REPORT_LUA"]

_COMMON = """
local now = tonumber(ARGV[#ARGV])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local key = KEYS[1]
local function get(f, d) local v = redis.call('HGET', key, f); if v then return tonumber(v) end; return d end
redis.call('PEXPIRE', key, 3600000)
local function effective(ceiling, learned)
  local found = -1
  if ceiling > 0 then found = ceiling end
  if learned > 0 and (found < 0 or learned * 0.97 < found) then found = learned * 0.97 end
  if found < 0 then return 0 end
  return found
end
local function level(name, per_min)
  local cap = math.max(1.0, per_min / 60)
  local lv = math.min(cap, get(name .. '_level', cap) + (now - get(name .. '_ts', now)) * per_min / 60000)
  redis.call('HSET', key, name .. '_level', tostring(lv), name .. '_ts', tostring(now))
  return lv
end
local function decay(window_s)
  local factor = 0.5 ^ (math.max(0, now - get('count_ts', now)) / (window_s * 1000))
  local fails, oks = get('fails', 0) * factor, get('oks', 0) * factor
  redis.call('HSET', key, 'fails', tostring(fails), 'oks', tostring(oks), 'count_ts', tostring(now))
  return fails, oks
end
local function current_limit(concurrency, min_concurrency)
  return math.min(concurrency, math.max(min_concurrency, get('limit', 1e9)))
end
"""

ACQUIRE_LUA = (
    _COMMON
    + """
local rpm_ceiling, tpm_ceiling, need, probe_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local open_until = get('open_until', 0)
if open_until > now then return {tostring((open_until - now) / 1000), 0, 'open'} end
local probe_until = get('probe_until', 0)
if get('half_open', 0) == 1 and probe_until > now then
  return {tostring(math.min(1.0, (probe_until - now) / 1000)), 0, 'probe'}
end
local blocked = get('blocked_until', 0)
if blocked > now then return {tostring((blocked - now) / 1000), 0, 'blocked'} end
local rpm = effective(rpm_ceiling, get('learned_rpm', 0))
local tpm = effective(tpm_ceiling, get('learned_tpm', 0))
local function wait_for(name, per_min, n)
  if per_min <= 0 then return 0 end
  local lv = level(name, per_min)
  local enough = math.min(n, math.max(1.0, per_min / 60))
  if lv >= enough - 1e-9 then return 0 end
  return (enough - lv) / (per_min / 60000) / 1000
end
local wait = math.max(wait_for('req', rpm, 1), wait_for('tok', tpm, need))
if wait > 0 then return {tostring(wait), 0, 'rate'} end
if rpm > 0 then redis.call('HINCRBYFLOAT', key, 'req_level', -1) end
if tpm > 0 then redis.call('HINCRBYFLOAT', key, 'tok_level', -need) end
if get('half_open', 0) == 1 then
  redis.call('HSET', key, 'probe_until', tostring(now + probe_ms))
  return {'0', 1, ''}
end
return {'0', 0, ''}
"""
)

REPORT_LUA = (
    _COMMON
    + """
local outcome, probe, failures, cooldown, ratio, window_s = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fails, oks = decay(window_s)
local fresh, quiet_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
oks = oks + fresh
redis.call('HSET', key, 'oks', tostring(oks))
if fresh > 0 then redis.call('HSET', key, 'last_ok', tostring(now)) end
if outcome == 'ok' then
  redis.call('HSET', key, 'oks', tostring(oks + 1), 'last_ok', tostring(now))
  if probe == 1 or get('half_open', 0) == 1 then
    redis.call('HSET', key, 'half_open', 0, 'probe_until', 0, 'fails', 0)
  end
  return 0
end
if get('open_until', 0) > now or (get('half_open', 0) == 1 and probe == 0) then return 0 end
fails = fails + 1
redis.call('HSET', key, 'fails', tostring(fails))
local silent = now - get('last_ok', now) >= quiet_ms
local dominant = fails >= ratio * (fails + oks)
if probe == 1 or (fails >= failures - 0.5 and (dominant or silent)) then
  redis.call('HSET', key, 'open_until', tostring(now + cooldown * 1000), 'half_open', 1, 'probe_until', 0, 'fails', 0, 'oks', 0)
end
return 0
"""
)

OBSERVE_LUA = (
    _COMMON
    + """
local ceilings = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local names = {'rpm', 'tpm'}
local buckets = {'req', 'tok'}
for i = 1, 2 do
  local base = 2 + (i - 1) * 3
  local limit, remaining, reset_s = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  if limit > 0 then redis.call('HSET', key, 'learned_' .. names[i], tostring(limit)) end
  local per_min = effective(ceilings[i], get('learned_' .. names[i], 0))
  if remaining >= 0 then
    if per_min > 0 then
      local lv = level(buckets[i], per_min)
      redis.call('HSET', key, buckets[i] .. '_level', tostring(math.min(lv, remaining)))
    elseif remaining == 0 and reset_s > 0 then
      redis.call('HSET', key, 'blocked_until', tostring(math.max(get('blocked_until', 0), now + reset_s * 1000)))
    end
  end
end
return 0
"""
)

LEASE_LUA = (
    _COMMON
    + """
local holders_key = KEYS[2]
local token, want, in_use, successes, limited = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local concurrency, min_concurrency, ttl_ms, window_s = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local fails, oks = decay(window_s)
redis.call('HSET', key, 'oks', tostring(oks + tonumber(ARGV[10])))
if tonumber(ARGV[10]) > 0 then redis.call('HSET', key, 'last_ok', tostring(now)) end
local limit = current_limit(concurrency, min_concurrency)
if limited == 1 and successes > 0 and limit < concurrency then
  local acc = get('acc', 0) + successes
  local overload_at = get('overload_at', math.huge)
  local function window(l)
    if l + 1 > overload_at then return math.floor(l) * 4 end
    return math.floor(l)
  end
  while acc >= window(limit) and limit < concurrency do
    acc = acc - window(limit)
    limit = math.min(concurrency, limit + 1)
  end
  if limit >= concurrency then acc = 0 end
  redis.call('HSET', key, 'acc', tostring(acc))
end
redis.call('HSET', key, 'limit', tostring(limit))
local cap = math.floor(limit)
local held_by_others, wanted_by_others, active = 0, 0, 0
local entries = redis.call('HGETALL', holders_key)
for i = 1, #entries, 2 do
  local held, wanted, expires = string.match(entries[i + 1], '^(%d+):(%d+):([%d%.]+)$')
  held, wanted, expires = tonumber(held), tonumber(wanted), tonumber(expires)
  if expires == nil or expires <= now then
    redis.call('HDEL', holders_key, entries[i])
  elseif entries[i] ~= token then
    held_by_others = held_by_others + held
    wanted_by_others = wanted_by_others + wanted
    if wanted > 0 then active = active + 1 end
  end
end
if want > 0 then active = active + 1 end
local fair = math.ceil(cap / math.max(1, active))
local granted = math.max(0, math.min(want, cap - held_by_others, math.max(fair, cap - wanted_by_others)))
redis.call('HSET', holders_key, token, math.max(granted, in_use) .. ':' .. want .. ':' .. string.format('%.3f', now + ttl_ms))
redis.call('PEXPIRE', holders_key, 3600000)
return {granted, tostring(limit), get('epoch', 0), tostring(get('open_until', 0))}
"""
)

OVERLOAD_LUA = (
    _COMMON
    + """
local token, epoch, in_flight = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local concurrency, min_concurrency, backoff = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local limit = current_limit(concurrency, min_concurrency)
local current = get('epoch', 0)
if epoch == current then
  local others = 0
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    local held, wanted, expires = string.match(entries[i + 1], '^(%d+):(%d+):([%d%.]+)$')
    if entries[i] ~= token and tonumber(expires) ~= nil and tonumber(expires) > now then
      others = others + tonumber(held)
    end
  end
  redis.call('HSET', key, 'overload_at', tostring(limit))
  limit = math.max(min_concurrency, math.min(limit * backoff, math.max(others + in_flight, limit / 2)))
  current = current + 1
  redis.call('HSET', key, 'limit', tostring(limit), 'epoch', current, 'acc', 0)
end
return {tostring(limit), current}
"""
)
