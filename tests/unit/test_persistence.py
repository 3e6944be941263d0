"""Persistence (server/durability/persistence.py) against the in-memory store as the fake of a shared one: writes, the
compare-and-set on revisions, refused and unsure writes, the write-back of a newer copy over an older store and
the reload of a newer record. The same cases run against a real redis-server in
tests/system/test_persistence_redis.py (tests/persistence_cases.py holds them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from persistence_cases import CASES

from rnnserve.server.durability.store import SessionStore
from rnnserve.server.durability.store.memory import MemoryStore


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_persistence_against_the_memory_store(case: Callable[..., None], tmp_path: Path) -> None:
    store = MemoryStore(ttl=60)
    # As a store replicas share (a Redis): a copy checks it for newer records (Persistence.stale). Every
    # replica of a case gets this one store, each with its own writer id.
    store.durable = True

    def stores() -> SessionStore:
        return store

    case(stores, tmp_path)
