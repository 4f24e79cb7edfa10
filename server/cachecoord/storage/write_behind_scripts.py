"""The Lua scripts of write-behind namespaces (write_behind_store.py).

KEYS of a key's value, lease, queue and invalidation log share one hash tag
(the key's partition, see keys.py). Queued ("dirty") values carry an upper-case envelope
tag and no TTL until flushed (SETTLE).
"""

from __future__ import annotations

from cachecoord.storage.scripts import ANNOUNCE, ENVELOPE

_WRITE_BODY = """
local current = redis.call('GET', KEYS[1])
local previous, visible = 0, 0
if current then
  local kind
  previous, kind = envelope_version_and_tag(current)
  if kind ~= 'n' and kind ~= 'N' then visible = previous end
end
local expected = tonumber(ARGV[3])
if expected >= 0 then
  if not current then return {-2, 0} end
  if visible ~= expected then return {0, visible} end
end
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[4]) then return {-1, 0} end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local version = string.format('%.0f', math.max(previous + 1, clock))
local fresh_until = string.format('%.0f', math.floor(clock / 1000) + tonumber(ARGV[6]))
local stored = ARGV[2]
if ARGV[11] ~= '' and stored == 'v' then stored = 't' end
redis.call('SET', KEYS[1], envelope_dirty(version, fresh_until, stored, ARGV[11] .. ARGV[1]))
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', ARGV[7], 'v', version, 't', ARGV[2], 'p', ARGV[1],
  'c', ARGV[8], 'g', ARGV[11])
announce(KEYS[4], ARGV[5], ARGV[9] .. version .. ARGV[10], ARGV[12], ARGV[13], ARGV[14])
return {1, tonumber(version)}
"""

# Value, enqueue (XADD) and invalidation message in one script, so a Put is
# acknowledged only when both the value and its queue entry exist.
# KEYS: value, lease, queue, log. ARGV: payload, kind (v|n), expected version
# (-1: none), queue bound, channel, fresh ms, key, traceparent of the Put (so
# the flush span can link to it), message before and after its version, the
# value's tag prefix (envelope.py tag_prefix; '' without tags: queued as 'g'),
# partition, log max_len, log max_age_ms.
# Returns {1, version} written, {0, current} version conflict, {-1, 0} queue
# full, {-2, 0} not cached (the caller loads the key, then retries).
WRITE = ENVELOPE + ANNOUNCE + _WRITE_BODY

# WRITE, run only if the key is still at the version the dead lettering left
# it at (ARGV[15]; an absent value passes: the caller checked PostgreSQL's
# version). KEYS and ARGV 1-14 as WRITE.
# Returns as WRITE, or {0, current} when the key was written since.
REPLAY = (
    ENVELOPE
    + ANNOUNCE
    + """
local head = redis.call('GET', KEYS[1])
if head then
  local seen = envelope_version(head)
  if seen ~= tonumber(ARGV[15]) then return {0, seen} end
end
"""
    + _WRITE_BODY
)

# Give a flushed value its TTL, unless a newer write replaced it meanwhile;
# with ARGV[3], replace it by the row as PostgreSQL stored it (defaults and
# all) under the same version.
# KEYS: value. ARGV: flushed version, px, replacement envelope ('' none).
# Returns 'OK' if settled, 0 if the value was rewritten or is gone.
SETTLE = (
    ENVELOPE
    + """
local current = redis.call('GET', KEYS[1])
if current and envelope_version(current) == tonumber(ARGV[1]) then
  if ARGV[3] ~= '' then return redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) end
  return redis.call('SET', KEYS[1], envelope_clean(current), 'PX', ARGV[2])
end
return 0
"""
)

# A dead-lettered write never reaches PostgreSQL. If it is still the key's
# latest write (or Redis lost the key), the key moves on to a *new* version,
# numbered like every write-behind write (max(previous + 1, Redis clock in
# µs)), holding the row PostgreSQL has: dropping the value instead would make
# reads fall back to PostgreSQL's older version, and versions go backwards.
# The value is queued like a write (kind 'r': its flush only moves
# PostgreSQL's version of the key up to it), so it stays dirty (no TTL) until
# PostgreSQL's version has caught up, and a compare-and-set against the
# rejected version fails. Any in-flight fill is cancelled (lease deleted).
# KEYS: value, lease, queue, log. ARGV: rejected version, kind (v|n),
# PostgreSQL's row, fresh ms, channel, key, message before and after its
# version, partition, log max_len, log max_age_ms.
# Returns the new version, or 0 if a newer write replaced the rejected one.
REVERT = (
    ENVELOPE
    + ANNOUNCE
    + """
local current = redis.call('GET', KEYS[1])
local previous = tonumber(ARGV[1])
if current then
  if envelope_version(current) ~= previous then return 0 end
end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local version = string.format('%.0f', math.max(previous + 1, clock))
local fresh_until = string.format('%.0f', math.floor(clock / 1000) + tonumber(ARGV[4]))
redis.call('SET', KEYS[1], envelope_dirty(version, fresh_until, ARGV[2], ARGV[3]))
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'k', ARGV[6], 'v', version, 't', 'r', 'p', '', 'c', '')
announce(KEYS[4], ARGV[5], ARGV[7] .. version .. ARGV[8], ARGV[9], ARGV[10], ARGV[11])
return tonumber(version)
"""
)
