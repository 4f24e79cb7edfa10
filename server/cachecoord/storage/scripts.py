"""The Lua scripts of cache entries (redis_store.py), the Lua helper that
reads and writes the value envelope (envelope.py) for every script, and the
one that announces a change (ANNOUNCE: its invalidation log, then pub/sub).

Each script touches the keys of a single entry and its partition's log (one
hash tag, see keys.py). In generation mode KEYS[1] is the key's generation
counter and ARGV[1] the value key's prefix; the value key is
``<prefix>:g<generation>``.
"""

from __future__ import annotations

ENVELOPE = """
-- The value envelope of storage/envelope.py:
-- <version>:<fresh_until_ms>:<load_ms>:<tag><payload>, tag v|n, V|N while dirty;
-- t (T dirty) for a value with tags, whose payload starts with <clock>:<length>:<tags>.
local function envelope_version(raw)
  return tonumber(string.match(raw, '^(%d+):'))
end
local function envelope_version_and_tag(raw)
  local version, tag = string.match(raw, '^(%d+):%d+:%d+:(.)')
  return tonumber(version), tag
end
-- A dirty (not yet flushed) value of kind v|n.
local function envelope_dirty(version, fresh_until, kind, payload)
  return version .. ':' .. fresh_until .. ':0:' .. string.upper(kind) .. payload
end
-- The same value, no longer dirty.
local function envelope_clean(raw)
  local head, tag, payload = string.match(raw, '^(%d+:%d+:%d+:)(.)(.*)$')
  return head .. string.lower(tag) .. payload
end
"""
"""Prepended to every script that looks inside a cached value."""

PUBLISH = """
-- Publish on a classic channel (cc:inv:<ns>: PUBLISH, which a cluster
-- broadcasts to every node) or on a shard channel (its name has a hash tag,
-- cc:inv:{<ns>:<p>}, keys.is_shard_channel: SPUBLISH, which stays on the
-- node owning the slot; the script's keys share that slot).
local function publish(channel, message)
  if string.find(channel, '{', 1, true) then
    return redis.call('SPUBLISH', channel, message)
  end
  return redis.call('PUBLISH', channel, message)
end
"""
"""Prepended to every script that publishes on a namespace's channel."""

ANNOUNCE = (
    PUBLISH
    + """
-- A change: append its message to the partition's invalidation log (a Redis
-- Stream, storage/invalidation_log.py), trimmed to about max_len entries
-- (MAXLEN ~: whole nodes only, so it stays cheap) and exactly to max_age_ms
-- (MINID, against the new entry's own clock), then publish the message with
-- its partition and position (the entry id) added as its last two fields, on
-- channel (KeySpace.channel_of(partition): classic or the partition's shard
-- channel, see publish). The message is a JSON object: it ends with '}'.
-- Returns the position.
local function announce(log, channel, message, partition, max_len, max_age_ms)
  local id = redis.call('XADD', log, 'MAXLEN', '~', max_len, '*', 'm', message)
  local oldest = tonumber(string.match(id, '^(%d+)-')) - tonumber(max_age_ms)
  if oldest > 0 then redis.call('XTRIM', log, 'MINID', string.format('%.0f', oldest)) end
  publish(channel, string.sub(message, 1, -2) .. ',"partition":' .. partition
    .. ',"position":"' .. id .. '"}')
  return id
end
"""
)
"""Prepended to every script that makes a change. Its channel is
``KeySpace.channel_of(partition)``, its last three arguments (partition,
max_len, max_age_ms) are InvalidationLog.announce_args()."""

_VALUE_KEY = """
local function value_key(gen_key, prefix)
  return prefix .. ':g' .. (redis.call('GET', gen_key) or '0')
end
"""

# KEYS: generation, lease. ARGV: value key prefix. Returns the value or nil.
GET_GENERATION = (
    _VALUE_KEY
    + """
return redis.call('GET', value_key(KEYS[1], ARGV[1]))
"""
)

# A refresh must not replace a value newer than what it loaded, nor a
# write-behind value not yet flushed (no TTL): PostgreSQL is behind it.
_NEWER_CACHED = (
    ENVELOPE
    + """
local function newer_cached(key, envelope)
  local current = redis.call('GET', key)
  if not current then return false end
  if redis.call('PTTL', key) == -1 then return true end
  local cached = envelope_version(current)
  return cached ~= nil and cached > envelope_version(envelope)
end
"""
)

# Take the lease of a missing key, in one step with looking at the key: a
# plain GET then SET NX would let a reader whose GET missed just before
# another reader's fill (which deletes the lease) take a new lease and load
# again. ARGV[3] = '1' takes the lease even if a value is there (reloading a
# value kept only for stale-if-error, or refreshing one).
# KEYS: value, lease. ARGV: token, lease ms, even if cached (0|1).
# Returns the value if it is there, 1 if leased, 0 if someone else holds the lease.
LEASE = """
if ARGV[3] ~= '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return value end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: generation, lease. ARGV: value key prefix, then as LEASE. Returns as LEASE.
LEASE_GENERATION = (
    _VALUE_KEY
    + """
if ARGV[4] ~= '1' then
  local value = redis.call('GET', value_key(KEYS[1], ARGV[1]))
  if value then return value end
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""
)

# Fill only while the reader's lease is still there: any write or invalidation
# since the lease was granted deleted it (memcache leases, NSDI'13 3.2.1).
# The fill notice wakes readers on other instances waiting for this fill.
# KEYS: value, lease. ARGV: token, envelope, px, channel, fill notice.
# Returns 1 if filled, 0 if the lease was lost or a newer value is cached.
FILL = (
    PUBLISH
    + _NEWER_CACHED
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if newer_cached(KEYS[1], ARGV[2]) then redis.call('DEL', KEYS[2]) return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
publish(ARGV[4], ARGV[5])
return 1
"""
)

# KEYS: generation, lease. ARGV: value key prefix, then as FILL. Returns as FILL.
FILL_GENERATION = (
    PUBLISH
    + _VALUE_KEY
    + _NEWER_CACHED
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local target = value_key(KEYS[1], ARGV[1])
if newer_cached(target, ARGV[3]) then redis.call('DEL', KEYS[2]) return 0 end
redis.call('SET', target, ARGV[3], 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
publish(ARGV[5], ARGV[6])
return 1
"""
)

# Drop the cached copy and any lease (so an in-flight fill is rejected), and
# tell every instance; atomically, so no reader sees one without the other.
# A value without TTL is a write-behind value not yet flushed to PostgreSQL:
# it is the newest version there is, and dropping it would lose it.
# KEYS: value, lease, log. ARGV: channel, message, partition, log max_len, log max_age_ms.
# Returns how many values were dropped.
INVALIDATE = (
    ANNOUNCE
    + """
local dropped = 0
if redis.call('PTTL', KEYS[1]) ~= -1 then dropped = redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2])
announce(KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return dropped
"""
)

# KEYS: generation, lease, log. ARGV: value key prefix, channel, message,
# partition, log max_len, log max_age_ms.
# Returns 1 if a value was retired (bumps the generation), else 0.
INVALIDATE_GENERATION = (
    _VALUE_KEY
    + ANNOUNCE
    + """
local dropped = redis.call('EXISTS', value_key(KEYS[1], ARGV[1]))
redis.call('INCR', KEYS[1])
redis.call('DEL', KEYS[2])
announce(KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return dropped
"""
)

# KEYS: a value. Returns 1 if it was deleted, 0 if it is unflushed (no TTL) or gone.
DROP_IF_CLEAN = """
if redis.call('PTTL', KEYS[1]) == -1 then return 0 end
return redis.call('DEL', KEYS[1])
"""

# Cache a value just written (write-through) unless a newer version is cached.
_STORE_BODY = """
local current = redis.call('GET', target)
redis.call('DEL', lease)
announce(KEYS[3], ARGV[n + 3], ARGV[n + 4], ARGV[n + 5], ARGV[n + 6], ARGV[n + 7])
if current then
  local version = envelope_version(current)
  if version and version >= tonumber(ARGV[n + 2]) then return 0 end
end
redis.call('SET', target, ARGV[n], 'PX', ARGV[n + 1])
return 1
"""

# KEYS: value, lease, log. ARGV: envelope, px, version, channel, message,
# partition, log max_len, log max_age_ms.
# Returns 1 if stored, 0 if a newer version is cached (the message goes out either way).
STORE = ENVELOPE + ANNOUNCE + "local target, lease, n = KEYS[1], KEYS[2], 1\n" + _STORE_BODY

# KEYS: generation, lease, log. ARGV: value key prefix, then as STORE. Returns as STORE.
STORE_GENERATION = (
    _VALUE_KEY
    + ENVELOPE
    + ANNOUNCE
    + "local target, lease, n = value_key(KEYS[1], ARGV[1]), KEYS[2], 2\n"
    + _STORE_BODY
)

# A whole-namespace invalidation, announced in one partition's log (the
# caller runs it for every partition).
# KEYS: log. ARGV: channel, message, partition, log max_len, log max_age_ms.
# Returns the position.
ANNOUNCE_ALL = ANNOUNCE + "return announce(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])\n"
# A namespace's tag clock is a plain key (keys.py KeySpace.tag_clock), read
# with every value (one MGET on a single Redis); its marks are a hash
# (KeySpace.tags): tag -> the clock value at which the tag was last
# invalidated, and field '' (never a tag: tags are 1 to 128 bytes) the clock
# as the hash last saw it. Both share a hash tag and change together here,
# so a reader that finds the hash's '' behind the clock knows the hash was
# lost (evicted, flushed), and a clock behind a value's means the clock was:
# either way the value counts as invalid (strategies/tagging.py). The clock
# moves to max(clock + 1, Redis time in µs): it keeps increasing even after
# Redis lost both. The caller then announces each tag in one partition's
# invalidation log (ANNOUNCE_ALL): the logs' keys are on other slots.
# KEYS: the clock, the marks hash. ARGV: the tags.
# Returns the new clock value.
INVALIDATE_TAGS = """
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
local seen = math.max(tonumber(redis.call('GET', KEYS[1])) or 0,
  tonumber(redis.call('HGET', KEYS[2], '')) or 0)
local stamp = string.format('%.0f', math.max(seen + 1, micros))
redis.call('SET', KEYS[1], stamp)
redis.call('HSET', KEYS[2], '', stamp)
for i = 1, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], stamp) end
return stamp
"""

# The tag clock, started if it is not there (a namespace's first tagged value,
# or Redis lost it): a tagged value always records a clock that exists, so a
# clock read as 0 later means it was lost (strategies/tagging.py). Started at
# max(marks' copy + 1, Redis time in µs); the marks' copy ('') is moved too
# only if the marks are there: if they were lost as well, the copy stays
# behind the clock and says so.
# KEYS: the clock, the marks hash. Returns the clock.
START_TAG_CLOCK = """
local clock = redis.call('GET', KEYS[1])
if clock then return clock end
local now = redis.call('TIME')
local micros = tonumber(now[1]) * 1000000 + tonumber(now[2])
local seen = tonumber(redis.call('HGET', KEYS[2], '')) or 0
local stamp = string.format('%.0f', math.max(seen + 1, micros))
redis.call('SET', KEYS[1], stamp)
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HSET', KEYS[2], '', stamp) end
return stamp
"""
