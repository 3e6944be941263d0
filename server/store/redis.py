"""The Redis session store: one string per session (``rnnserve:session:ID``, server/store/codec.py), each
written with its TTL in the same command (SET ... PX). A batch of records is one MULTI/EXEC pipeline: one
round trip, all or nothing."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from rnnserve.server.store import SessionRecord, SessionStore, StoreUnavailable
from rnnserve.server.store.codec import decode_record, encode_record

PREFIX = "rnnserve:session:"
T = TypeVar("T")


def redact(url: str) -> str:
    """The address without its password (it goes into error messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RedisStore(SessionStore):
    durable = True
    inline = False

    def __init__(self, url: str, *, ttl: float, timeout: float = 2.0):
        super().__init__(ttl)
        self.url = redact(url)
        # Short timeouts: an every-step batch waits on this store, so a hung Redis must fail the batch
        # (UNAVAILABLE) in bounded time. Two quick retries cover a pooled connection that a Redis restart
        # closed; the writes are idempotent, so a retried pipeline is harmless.
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 1.0),
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 2),
        )
        self._ttl_ms = max(1, int(ttl * 1000))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"session store {self.url} is unavailable ({what}): {exc}") from exc

    def put_many(self, records: Sequence[SessionRecord]) -> None:
        if not records:
            return
        encoded = [(PREFIX + r.session_id, encode_record(r)) for r in records]

        def put() -> None:
            pipe = self._client.pipeline(transaction=True)
            for key, value in encoded:
                pipe.set(key, value, px=self._ttl_ms)
            pipe.execute()

        self._call(f"writing {len(records)} session(s)", put)

    def get_many(self, session_ids: Sequence[str]) -> list[SessionRecord | None]:
        if not session_ids:
            return []

        keys = [PREFIX + sid for sid in session_ids]
        found = self._call(f"reading {len(session_ids)} session(s)", lambda: self._client.mget(keys))
        return [decode_record(sid, f) if f else None for sid, f in zip(session_ids, found, strict=True)]

    def delete_many(self, session_ids: Sequence[str]) -> None:
        if session_ids:
            self._call("deleting sessions", lambda: self._client.delete(*(PREFIX + sid for sid in session_ids)))

    def keys(self) -> list[str]:
        def scan() -> list[str]:
            return [k.decode()[len(PREFIX) :] for k in self._client.scan_iter(match=PREFIX + "*", count=1000)]

        return self._call("listing sessions", scan)

    def ping(self) -> None:
        self._call("ping", self._client.ping)

    def close(self) -> None:
        self._client.close()
