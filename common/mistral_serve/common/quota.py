"""Per-caller quotas in Redis: the one home of the bucket rules, for the frontend and the worker.

A caller's quota has three limits, each kept in the pool's slot (`keys.quota_keys`):
- requests per second: a token bucket of `max(1, rps)` requests refilled at `rps` a second;
- tokens per minute: a token bucket of `tpm` tokens refilled at `tpm` a minute. Admission charges a
  request's cost (prompt tokens plus its clamped max_tokens); when it ends, the worker gives back
  what it did not use (or charges what it used beyond the cost: a frontend without a tokenizer
  charges no prompt tokens);
- requests in flight: a ZSET of request ids scored by their deadline. A worker removes a request
  when it ends; members past their deadline are dropped before counting, so a lost worker's
  requests stop counting by themselves.

Buckets refill by Redis's clock (`TIME` inside the scripts), never a frontend's: frontends whose
clocks differ share one bucket. A bucket absent from Redis is full (it expires once it would be).

Admission checks all three limits and charges all or none, in the admission script itself
(`frontend/queue.py`): `ADMIT_CHECK` runs first and returns `{limit, ms until it refills}` when one is
reached; `ADMIT_CHARGE` runs once the request is sure to be queued. Their keys and arguments come
last in the script's KEYS and ARGV (`admission_keys`, `admission_args`), so the fragments read them
from the end, whatever the rest of the script takes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from mistral_serve.queue.v1 import queue_pb2
from mistral_serve.v1 import chat_pb2

from . import keys

log = logging.getLogger(__name__)

# The limits, by the names QuotaFailure, the OpenAI error's `code` and the metrics give them.
REQUESTS_PER_SECOND = "requests_per_second"
TOKENS_PER_MINUTE = "tokens_per_minute"
REQUESTS_IN_FLIGHT = "requests_in_flight"
LIMITS = (REQUESTS_PER_SECOND, TOKENS_PER_MINUTE, REQUESTS_IN_FLIGHT)


@dataclass(frozen=True, slots=True)
class Quota:
    """One caller's limits; None is no limit. `weight` is the caller's share in fair queueing."""

    requests_per_s: float | None = None
    tokens_per_min: int | None = None
    max_inflight: int | None = None
    weight: float = 1.0


UNLIMITED = Quota()

# The bucket rule, shared by both scripts: `q_now` (ms, Redis's clock), a bucket's level now, and
# storing a level (with the bucket's size and rate, which the worker's give-back needs and does not
# know). A bucket expires when it would be full again.
_BUCKET = """
local q_clock = redis.call('TIME')
local q_now = tonumber(q_clock[1]) * 1000 + math.floor(tonumber(q_clock[2]) / 1000)
local function q_level(key, cap, per_ms)
  local state = redis.call('HMGET', key, 'level', 'ms')
  if not state[1] then
    return cap
  end
  return math.min(cap, tonumber(state[1]) + math.max(0, q_now - tonumber(state[2])) * per_ms)
end
local function q_store(key, level, cap, per_ms)
  redis.call('HSET', key, 'level', tostring(level), 'ms', q_now,
    'cap', tostring(cap), 'per_ms', tostring(per_ms))
  redis.call('PEXPIRE', key, math.ceil(math.max(0, cap - level) / per_ms) + 1000)
end
"""

# KEYS[#KEYS-2..]: rps bucket, tpm bucket, in-flight set. ARGV[#ARGV-6..]: the rps, tpm and in-flight
# limits ('' for none), the cost in tokens, the request id, ms to its deadline, and the retry delay
# (ms) for a full in-flight set (when a request ends is not known in advance).
ADMIT_CHECK = (
    _BUCKET
    + """
local qk, qa = #KEYS - 3, #ARGV - 7
local q_rps, q_tpm, q_max = tonumber(ARGV[qa + 1]), tonumber(ARGV[qa + 2]), tonumber(ARGV[qa + 3])
local q_cost = tonumber(ARGV[qa + 4])
if q_max then
  redis.call('ZREMRANGEBYSCORE', KEYS[qk + 3], '-inf', q_now)
  if redis.call('ZCARD', KEYS[qk + 3]) >= q_max then
    return {'requests_in_flight', tonumber(ARGV[qa + 7])}
  end
end
local q_rps_cap, q_rps_per_ms, q_rps_level
if q_rps then
  q_rps_cap, q_rps_per_ms = math.max(1, q_rps), q_rps / 1000
  q_rps_level = q_level(KEYS[qk + 1], q_rps_cap, q_rps_per_ms)
  if q_rps_level < 1 then
    return {'requests_per_second', math.ceil((1 - q_rps_level) / q_rps_per_ms)}
  end
end
local q_tpm_cap, q_tpm_per_ms, q_tpm_level
if q_tpm then
  q_tpm_cap, q_tpm_per_ms = q_tpm, q_tpm / 60000
  q_tpm_level = q_level(KEYS[qk + 2], q_tpm_cap, q_tpm_per_ms)
  if q_tpm_level < q_cost then
    return {'tokens_per_minute', math.ceil((q_cost - q_tpm_level) / q_tpm_per_ms)}
  end
end
"""
)

ADMIT_CHARGE = """
if q_rps then
  q_store(KEYS[qk + 1], q_rps_level - 1, q_rps_cap, q_rps_per_ms)
end
if q_tpm then
  q_store(KEYS[qk + 2], q_tpm_level - q_cost, q_tpm_cap, q_tpm_per_ms)
end
if q_max then
  redis.call('ZADD', KEYS[qk + 3], q_now + tonumber(ARGV[qa + 6]), ARGV[qa + 5])
  local q_last = redis.call('ZRANGE', KEYS[qk + 3], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[qk + 3], math.ceil(tonumber(q_last[2])) + 1000)
end
"""

# KEYS: tpm bucket, in-flight set. ARGV: tokens to give back (negative: to charge), the request id.
_GIVE_BACK = (
    _BUCKET
    + """
redis.call('ZREM', KEYS[2], ARGV[2])
local delta = tonumber(ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'cap', 'per_ms')
if delta == 0 or not state[1] then
  return false
end
local cap, per_ms = tonumber(state[1]), tonumber(state[2])
local level = math.min(cap, q_level(KEYS[1], cap, per_ms) + delta)
q_store(KEYS[1], level, cap, per_ms)
return tostring(level)
"""
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit an admission reached, and how long until it lets the request in."""

    limit: str
    retry_ms: int


def admission_keys(pool: str, caller: str) -> list[str]:
    return keys.quota_keys(pool, caller)


def admission_args(
    quota: Quota, *, cost_tokens: int, request_id: str, deadline_ms: int, in_flight_retry_ms: int
) -> list[str | int | float]:
    def limit(value: float | None) -> str | int | float:
        return "" if value is None else value

    return [
        limit(quota.requests_per_s),
        limit(quota.tokens_per_min),
        limit(quota.max_inflight),
        cost_tokens,
        request_id,
        max(1, deadline_ms),
        max(1, in_flight_retry_ms),
    ]


def refusal(reply: object) -> Refusal | None:
    """The admission script's answer when a quota refused the request, else None."""
    if not isinstance(reply, list):
        return None
    limit, retry_ms = reply
    return Refusal(limit.decode() if isinstance(limit, bytes) else str(limit), int(retry_ms))


def nothing_to_settle(quota: Quota) -> bool:
    """Whether a request admitted under `quota` leaves nothing for its worker to give back: no
    tokens-per-minute bucket was charged and no in-flight entry added (a requests-per-second charge
    is never given back)."""
    return quota.tokens_per_min is None and quota.max_inflight is None


def tokens_used(terminal: chat_pb2.ChatEvent) -> int:
    """What a request that ended with `terminal` is charged: its prompt and output when it finished,
    nothing when it ended in an error (skipped, cancelled, past its deadline, failed): the caller
    got no answer."""
    if terminal.WhichOneof("event") != "finished":
        return 0
    usage = terminal.finished.usage
    return usage.prompt_tokens + usage.completion_tokens


async def settle(
    client: redis.Redis, pool: str, queued: queue_pb2.QueuedRequest, terminal: chat_pb2.ChatEvent
) -> None:
    """Reconcile a request that ended with `terminal`: out of the caller's in-flight set, and the
    tokens charged at admission trued up to what it used. A Redis error only logs: the in-flight
    entry lapses at the deadline and the bucket refills on its own."""
    if not queued.caller or queued.nothing_to_settle:
        return
    delta = queued.cost_tokens - tokens_used(terminal)
    _rps, tpm, inflight = keys.quota_keys(pool, queued.caller)
    try:
        await client.register_script(_GIVE_BACK)(keys=[tpm, inflight], args=[delta, queued.request_id])
    except RedisError as exc:
        log.warning("request %s: could not settle its quota: %s", queued.request_id, exc)
