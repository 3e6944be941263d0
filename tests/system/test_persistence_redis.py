"""Persistence (server/durability/persistence.py) against a real redis-server: the cases tests/unit/test_persistence.py
runs against the in-memory store (tests/persistence_cases.py), each replica on its own connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from persistence_cases import CASES
from redis_server import RedisServer, needs_redis

from rnnserve.server.durability.store import SessionStore, open_store


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@needs_redis
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_persistence_against_redis(case: Callable[..., None], redis_url: str, tmp_path: Path) -> None:
    opened: list[SessionStore] = []

    def stores() -> SessionStore:
        opened.append(open_store(redis_url, ttl=60))
        return opened[-1]

    try:
        case(stores, tmp_path)
    finally:
        for store in opened:
            store.delete_many(store.keys())
            store.close()
