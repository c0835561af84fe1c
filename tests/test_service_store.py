"""The job store on SQLite and on a real PostgreSQL: migrations, the state machine, and the atomic claim that keeps
two servers on one database from running the same job."""

from __future__ import annotations

import threading

import pytest

from .service_helpers import database_url

pytest.importorskip("sqlalchemy")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database: a SQLite file, or a schema of its own in the test PostgreSQL."""
    yield from database_url(request.param, tmp_path / "store.db")


def make_store(url):
    from lora_scripts.service.store import JobStore

    store = JobStore(url)
    store.migrate()
    return store


def test_migrations_are_versioned_and_idempotent(db_url):
    from lora_scripts.service.store import MIGRATIONS, schema_version

    store = make_store(db_url)
    assert store.migrate() == len(MIGRATIONS)  # a second start applies nothing new
    with store.engine.begin() as conn:
        versions = [r[0] for r in conn.execute(schema_version.select())]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    store.dispose()


def test_job_state_machine(db_url):
    store = make_store(db_url)
    a = store.create_job("a", "first", "x: 1")
    store.create_job("b", "second", "x: 2")
    assert a["state"] == "queued" and a["attempts"] == 0
    claimed = store.claim_next("w1")
    assert claimed["id"] == "a" and claimed["state"] == "running" and claimed["attempts"] == 1  # oldest first
    assert store.request_cancel("b")["state"] == "cancelled"  # queued: at once
    assert store.claim_next("w1") is None
    assert store.request_cancel("a")["cancel_requested"] is True  # running: the runner is asked
    assert store.cancel_requested("w1") == ["a"] and store.cancel_requested("w2") == []
    assert not store.finish("a", "w2", "succeeded", 0)  # not w2's job
    assert store.finish("a", "w1", "cancelled", 0)
    assert store.resume("a") and not store.resume("a")  # only once: now it is queued
    again = store.claim_next("w1")
    assert again["id"] == "a" and again["attempts"] == 2 and again["cancel_requested"] is False
    store.set_process("a", 1234, "999")
    assert store.running_jobs("w1")[0]["pid"] == 1234
    assert store.requeue("a", "w1") and store.get_job("a")["state"] == "queued"
    assert store.count_by_state() == {"queued": 1, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1}
    store.dispose()


def test_two_servers_never_claim_the_same_job(db_url):
    """Two stores (as two servers would have) with four claiming threads each race over 200 jobs."""
    first, second = make_store(db_url), make_store(db_url)
    for i in range(200):
        first.create_job(f"job{i:03d}", f"j{i}", "x: 1")
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claim_all(store, worker):
        start.wait()
        while (job := store.claim_next(worker)) is not None:
            with lock:
                claims.append((job["id"], worker))

    threads = [threading.Thread(target=claim_all, args=(store, f"{name}-{t}"))
               for name, store in (("s1", first), ("s2", second)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [c[0] for c in claims]
    assert len(ids) == 200 and len(set(ids)) == 200
    assert {w.split("-")[0] for _, w in claims} == {"s1", "s2"}  # both servers got work: it was a real race
    rows = first.list_jobs(limit=1000)
    assert all(r["state"] == "running" and r["attempts"] == 1 for r in rows)
    assert {r["id"]: r["worker"] for r in rows} == {i: w for i, w in claims}
    first.dispose()
    second.dispose()
