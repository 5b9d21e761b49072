"""Fair queueing within a priority band: the Redis layout of waiting requests and its two scripts.

A waiting request is not in the band's stream. It waits in its caller's LIST (`keys.caller_queue`),
each element its cost in tokens (4 bytes, big-endian), its admission time (Unix milliseconds, 13
decimal digits) and the serialized QueuedRequest. Per band a
ring LIST holds the callers with work waiting, a HASH their deficits and a HASH their weights. A
caller is in the ring exactly while its list is not empty; it joins at the tail and leaves with its
deficit (classic deficit round robin: an idle caller hoards no credit).

Workers take the next requests with `TAKE`, one script per take: bands highest first (strict), and
within a band deficit round robin weighted by tokens. The head of the ring is served while its
deficit covers the cost of its head request; otherwise it gets its quantum (weight x
`quantum_tokens`) and goes to the tail. A taken request is added to the band's stream and read by
this worker's consumer group in the same script, so from then on it is pending and leased exactly as
before (leases, takeover, resume, drain and ack work on the stream).

Each band also keeps a LIST with one element per waiting request (`keys.waiting_count`), its
admission time, in admission order: admission bounds waiting + running with its length, and KEDA's
`redis` scaler reads a list's length (LLEN), not a hash field or a counter, so a list is what lets a
pool scaled to zero wake for waiting work. A take removes the taken request's own time (LREM, from the
head, where the old ones are), so the head is the oldest waiting request's: the queue-wait gauge
reads one short element, never a request.

Every key carries the pool's hash tag; the take script reaches the callers' lists by name (built from
`keys.caller_queue_prefix`), which Redis Cluster allows because they live in the slot of its keys.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis

from mistral_serve.common import keys

_COST = struct.Struct(">I")
MAX_COST = 2**32 - 1
_ADMITTED_DIGITS = 13  # Unix milliseconds, until the year 2286
# A caller's weight multiplies its quantum. Bounded so that the turns a take skips stay finite numbers
# and no caller's credit is endless.
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000.0


def _with_layout(lua: str) -> str:
    """`lua` with the element layout filled in: where the admission time and the request begin
    (Lua strings count from 1), and the stream entry's field."""
    first = _COST.size + 1
    return (
        lua.replace("@ADMITTED@", f"{first}, {first + _ADMITTED_DIGITS - 1}")
        .replace("@REQUEST@", str(first + _ADMITTED_DIGITS))
        .replace("@REQUEST_FIELD@", keys.REQUEST_FIELD)
    )


# Queue one request: KEYS the caller's list, the band's ring, weights and waiting count, the pool's
# work-wake stream; ARGV the caller, its weight, the entry, the wake stream's MAXLEN. The wake entry
# breaks the XREAD of idle workers. A joining caller has no deficit yet: TAKE starts it at one quantum.
_ENQUEUE = """
local function fair_enqueue(list, ring, weights, waiting, work_wake, caller, weight, entry, wake_maxlen)
  if redis.call('RPUSH', list, entry) == 1 then
    redis.call('RPUSH', ring, caller)
  end
  redis.call('HSET', weights, caller, weight)
  redis.call('RPUSH', waiting, string.sub(entry, @ADMITTED@))
  redis.call('XADD', work_wake, 'MAXLEN', '~', wake_maxlen, '*', 'w', '1')
end
"""
ENQUEUE = _with_layout(_ENQUEUE)

# KEYS: per band, highest first, its stream, ring, deficits, weights and waiting count; last the
# work-wake stream. ARGV: group, consumer, count, quantum tokens, then each band's caller-list prefix.
# Returns {wake id, {stream, entries}...}: the wake stream's last id when nothing was taken (the
# worker blocks on it from there, so an admission after this script is never missed).
_TAKE = """
local group, consumer = ARGV[1], ARGV[2]
local left = tonumber(ARGV[3])
local quantum = tonumber(ARGV[4])
local bands = (#KEYS - 1) / 5

local function cost_of(entry)
  return (struct.unpack('>I4', entry))
end

local function admitted_of(entry)
  return string.sub(entry, @ADMITTED@)
end

local function quantum_of(weights, caller)
  return (tonumber(redis.call('HGET', weights, caller)) or 1) * quantum
end

local function deficit_of(deficits, weights, caller)
  local d = redis.call('HGET', deficits, caller)
  if d then
    return tonumber(d)
  end
  return quantum_of(weights, caller)
end

-- A whole turn of the ring served nobody: give every caller at once the R quanta after which the
-- first of them can pay for its head (R the fewest any needs), instead of R more turns one by one.
-- The ring's order is kept, so the outcome is the same as turning it R times.
local function skip_turns(ring, deficits, weights, prefix)
  local callers = redis.call('LRANGE', ring, 0, -1)
  local turns, state = nil, {}
  for i, caller in ipairs(callers) do
    local head = redis.call('LINDEX', prefix .. caller, 0)
    local q = quantum_of(weights, caller)
    local d = deficit_of(deficits, weights, caller)
    if head then
      local needs = math.ceil((cost_of(head) - d) / q)
      if turns == nil or needs < turns then
        turns = needs
      end
    end
    state[i] = {caller, d, q}
  end
  if turns == nil or turns <= 0 then
    return
  end
  for _, s in ipairs(state) do
    redis.call('HSET', deficits, s[1], s[2] + turns * s[3])
  end
end

local function take_band(stream, ring, deficits, weights, waiting, prefix, want)
  local taken, misses = 0, 0
  while taken < want do
    local caller = redis.call('LINDEX', ring, 0)
    if not caller then
      break
    end
    local list = prefix .. caller
    local head = redis.call('LINDEX', list, 0)
    if not head then  -- its list is gone (never left so by these scripts): it leaves the ring
      redis.call('LPOP', ring)
      redis.call('HDEL', deficits, caller)
    else
      local d = deficit_of(deficits, weights, caller)
      local cost = cost_of(head)
      if d >= cost then
        redis.call('LPOP', list)
        redis.call('XADD', stream, '*', '@REQUEST_FIELD@', string.sub(head, @REQUEST@))
        redis.call('LREM', waiting, 1, admitted_of(head))
        taken, misses = taken + 1, 0
        if redis.call('LLEN', list) == 0 then
          redis.call('LPOP', ring)
          redis.call('HDEL', deficits, caller)
          redis.call('HDEL', weights, caller)
        else
          redis.call('HSET', deficits, caller, d - cost)
        end
      else
        redis.call('HSET', deficits, caller, d + quantum_of(weights, caller))
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        misses = misses + 1
        if misses >= redis.call('LLEN', ring) then
          skip_turns(ring, deficits, weights, prefix)
          misses = 0
        end
      end
    end
  end
  return taken
end

local function read_new(stream, count)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, '>')
  if reply then
    return reply[1][2]
  end
  return {}
end

local result = {false}
for b = 0, bands - 1 do
  if left <= 0 then
    break
  end
  local stream, ring, deficits, weights, waiting = KEYS[b * 5 + 1], KEYS[b * 5 + 2], KEYS[b * 5 + 3],
    KEYS[b * 5 + 4], KEYS[b * 5 + 5]
  -- Entries added to the stream by other means (a frontend of the release before) come first. Read
  -- before any write: a missing group (Redis lost its data) fails the script having changed nothing.
  local entries = read_new(stream, left)
  left = left - #entries
  if left > 0 then
    local taken = take_band(stream, ring, deficits, weights, waiting, ARGV[5 + b], left)
    if taken > 0 then
      for _, entry in ipairs(read_new(stream, taken)) do
        table.insert(entries, entry)
      end
      left = left - taken
    end
  end
  if #entries > 0 then
    table.insert(result, {stream, entries})
  end
end
if #result == 1 then
  local last = redis.call('XREVRANGE', KEYS[#KEYS], '+', '-', 'COUNT', 1)
  result[1] = last[1] and last[1][1] or '0-0'
end
return result
"""
TAKE = _with_layout(_TAKE)

Entry = tuple[bytes, dict[bytes, bytes] | None]


def pack_entry(cost_tokens: int, admitted_unix: float, queued: bytes) -> bytes:
    """A caller-list element: the request's cost (at least 1, so every request spends deficit), its
    admission time and the serialized QueuedRequest."""
    admitted = b"%0*d" % (_ADMITTED_DIGITS, round(admitted_unix * 1000))
    return _COST.pack(min(max(cost_tokens, 1), MAX_COST)) + admitted + queued


def waiting_since(element: bytes) -> float:
    """The admission time (Unix seconds) a waiting-count element holds."""
    return int(element) / 1000


def enqueue_keys(pool: str, band: str, caller: str) -> list[str]:
    """The KEYS of `ENQUEUE`, in its order."""
    return [
        keys.caller_queue(pool, band, caller),
        keys.fair_ring(pool, band),
        keys.fair_weights(pool, band),
        keys.waiting_count(pool, band),
        keys.work_wake_stream(pool),
    ]


class FairTake:
    """A worker's take: up to `count` requests by band and fairness, already pending for this consumer."""

    def __init__(self, client: redis.Redis, *, pool: str, consumer_name: str, quantum_tokens: int) -> None:
        self._take = client.register_script(TAKE)
        self._keys = [
            *(
                key
                for band in keys.BANDS
                for key in (
                    keys.request_stream(pool, band),
                    keys.fair_ring(pool, band),
                    keys.fair_deficits(pool, band),
                    keys.fair_weights(pool, band),
                    keys.waiting_count(pool, band),
                )
            ),
            keys.work_wake_stream(pool),
        ]
        self._consumer = [keys.WORKER_GROUP, consumer_name]
        self._tail: list[str | int] = [
            quantum_tokens,
            *(keys.caller_queue_prefix(pool, band) for band in keys.BANDS),
        ]
        self.wake_stream = keys.work_wake_stream(pool)

    async def take(self, count: int) -> tuple[list[tuple[str, list[Entry]]], bytes | None]:
        """The entries taken, by stream; with none, the wake stream's last id to block on from."""
        reply = await self._take(keys=self._keys, args=[*self._consumer, count, *self._tail])
        wake_id, taken = reply[0], reply[1:]
        return [(_text(stream), _entries(entries)) for stream, entries in taken], (
            None if not wake_id else bytes(wake_id)
        )


def _entries(raw: Sequence[Any]) -> list[Entry]:
    out: list[Entry] = []
    for entry_id, flat in raw:
        fields = list(flat)
        out.append((bytes(entry_id), dict(zip(fields[0::2], fields[1::2], strict=True))))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
