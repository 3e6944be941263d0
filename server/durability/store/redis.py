"""The Redis session store: one hash per session (``rnnserve:session:KEY``, KEY: the record's key) with the
record's bytes (``b``, server/durability/store/codec.py), its revision (``r``) and its last writer (``w``), written with
its TTL.

Conditional writes and deletes (server/durability/store/__init__.py) are Lua scripts, so the test of the stored revision
and the write are one atomic step in Redis, and a batch of records is still one round trip. Reads are one
pipelined round trip too."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from rnnserve.server.durability.store import Expect, SessionRecord, SessionStore, StoreUnavailable, Unsure
from rnnserve.server.durability.store.codec import decode_record, encode_record

PREFIX = "rnnserve:session:"
T = TypeVar("T")

# SessionStore.holds, for a writer's copy at revision `expect` ('~N': Unsure N), against the record's stored
# revision `rev` and last writer `last`; also returns the copy's revision as a number.
_HOLDS = """
local function holds(expect, writer, rev, last)
  local unsure = string.sub(expect, 1, 1) == '~'
  local e = tonumber(unsure and string.sub(expect, 2) or expect)
  if rev == e then return (not unsure) or last == writer, e end
  return rev < e, e
end
"""

# KEYS: the sessions. ARGV: ttl ms, writer, 'u' (unconditional) or 'c', then per key the revision of the writer's
# copy and its bytes. Returns each key's new revision (above both the stored one and the copy's), 0 where refused.
_PUT = (
    _HOLDS
    + """
local ttl, writer, mode = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i, key in ipairs(KEYS) do
  local expect, body = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local cur = redis.call('HMGET', key, 'r', 'w')
  local rev = tonumber(cur[1]) or 0
  local ok, base = true, rev
  if mode ~= 'u' then
    local e
    ok, e = holds(expect, writer, rev, cur[2])
    if e > base then base = e end
  end
  if ok then
    redis.call('HSET', key, 'r', base + 1, 'w', writer, 'b', body)
    redis.call('PEXPIRE', key, ttl)
    out[i] = base + 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the sessions. ARGV: writer, 'u' or 'c', then per key the revision of the writer's copy (as above).
_DELETE = (
    _HOLDS
    + """
local writer, mode = ARGV[1], ARGV[2]
for i, key in ipairs(KEYS) do
  local ok = mode == 'u'
  if not ok then
    local cur = redis.call('HMGET', key, 'r', 'w')
    ok = holds(ARGV[2 + i], writer, tonumber(cur[1]) or 0, cur[2])
  end
  if ok then redis.call('DEL', key) end
end
return 0
"""
)


def redact(url: str) -> str:
    """The address without its password (it goes into error messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _expected(expect: Expect, n: int) -> tuple[str, list[str]]:
    if expect is None:
        return "u", [""] * n
    return "c", [f"~{int(e)}" if isinstance(e, Unsure) else str(int(e)) for e in expect]


class RedisStore(SessionStore):
    durable = True
    inline = False

    def __init__(self, url: str, *, ttl: float, timeout: float = 2.0):
        super().__init__(ttl)
        self.url = redact(url)
        # Short timeouts: an every-step batch waits on this store, so a hung Redis must fail the batch (its
        # outcome unknown) in bounded time. Two quick retries cover a pooled connection that a Redis restart
        # closed. A retried conditional write that had landed is refused (its revision moved on), which the
        # caller treats as a conflict and resolves by re-reading: safe.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 1.0),
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 2),
        )
        self._ttl_ms = max(1, int(ttl * 1000))
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"session store {self.url} is unavailable ({what}): {exc}") from exc

    def put_many(self, records: Sequence[SessionRecord], expect: Expect = None, writer: str = "") -> list[int]:
        if not records:
            return []
        mode, expected = _expected(expect, len(records))
        keys = [PREFIX + r.key for r in records]
        args: list[bytes | str | int] = [self._ttl_ms, writer, mode]
        for e, r in zip(expected, records, strict=True):
            args += [e, encode_record(r)]
        revisions = self._call(f"writing {len(records)} session(s)", lambda: self._put(keys=keys, args=args))
        return [int(r) for r in revisions]

    def get_many(self, keys: Sequence[str]) -> list[SessionRecord | None]:
        if not keys:
            return []

        def get() -> list:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(PREFIX + key, "r", "b")
            return pipe.execute()

        found = self._call(f"reading {len(keys)} session(s)", get)
        records: list[SessionRecord | None] = []
        for key, (revision, body) in zip(keys, found, strict=True):
            if not body:
                records.append(None)
                continue
            record = decode_record(key, body)
            record.revision = int(revision or 0)
            records.append(record)
        return records

    def revisions(self, keys: Sequence[str]) -> list[int]:
        def get() -> list:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(PREFIX + key, "r")
            return pipe.execute()

        return [int(r or 0) for r in self._call("reading revisions", get)] if keys else []

    def delete_many(self, keys: Sequence[str], expect: Expect = None, writer: str = "") -> None:
        if not keys:
            return
        mode, expected = _expected(expect, len(keys))
        names = [PREFIX + key for key in keys]
        self._call("deleting sessions", lambda: self._delete(keys=names, args=[writer, mode, *expected]))

    def keys(self) -> list[str]:
        def scan() -> list[str]:
            return [k.decode()[len(PREFIX) :] for k in self._client.scan_iter(match=PREFIX + "*", count=1000)]

        return self._call("listing sessions", scan)

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def close(self) -> None:
        self._client.close()
