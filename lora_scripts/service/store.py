"""The job store: datasets and jobs in SQLite (default, one file under the home) or PostgreSQL, via SQLAlchemy.

Schema changes are versioned migrations in :data:`MIGRATIONS`, applied in order at start-up and recorded in the
``schema_version`` table (a small hand-rolled scheme instead of Alembic: one table set, no autogenerate needed).

Claiming a job is one conditional ``UPDATE ... WHERE id = :id AND state = 'queued'`` whose row count says who won:
under SQLite writes are serialised, under PostgreSQL the losing transaction re-checks the WHERE clause after the
winner commits and updates nothing. So two runners (or two servers on one database) never run the same job.

Host failure: every runner bumps its row in ``workers`` (``beats``) every few seconds. Another runner that sees a
worker's count stand still for a whole lease takes that worker's running jobs over (:meth:`JobStore.take_over`), again
with a conditional UPDATE, so exactly one survivor requeues each job. Staleness is judged by each observer on its own
monotonic clock (a count that stopped changing), never by comparing the hosts' wall clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = ("succeeded", "failed", "cancelled")

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

datasets = Table(
    "datasets",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("state", String(16), nullable=False, index=True),
    Column("config_yaml", Text, nullable=False),
    Column("dataset_id", String(32), nullable=True),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("worker", String(200), nullable=True),  # which runner claimed it
    Column("pid", Integer, nullable=True),  # the trainer's pid = its process group id (own session)
    Column("proc_start", String(32), nullable=True),  # /proc start time, so a reused pid is never killed
    Column("attempts", Integer, nullable=False, default=0),  # times claimed (a resume counts)
    Column("exit_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
)


workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("beats", Integer, nullable=False),  # bumped every heartbeat; others watch it change
    Column("heartbeat_at", Float, nullable=False),  # wall clock of the last beat (for people; not used to judge)
    Column("started_at", Float, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    """Initial schema: datasets and jobs."""
    for table in (datasets, jobs):
        table.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    """Worker heartbeats, for taking over the jobs of a runner whose host died."""
    workers.create(conn, checkfirst=True)


# Append new migrations here; never edit one that has shipped.
MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1, _migration_2]


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL, a 30 s busy timeout and ``BEGIN IMMEDIATE`` transactions, so
    concurrent writers (threads or server processes) queue instead of failing with 'database is locked'."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]  # psycopg 3, not the default psycopg2
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class JobStore:
    """Datasets and jobs, and the job state machine: queued -> running -> succeeded | failed | cancelled;
    cancelled or failed -> queued again on resume."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    # --- schema -------------------------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply the migrations this database lacks; return the schema version. Safe with concurrent servers."""
        with self.engine.begin() as conn:
            if self.is_postgres:  # one migrator at a time across servers
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
            for number, migration in enumerate(MIGRATIONS, start=1):
                if number > current:
                    migration(conn)
                    conn.execute(insert(schema_version).values(version=number))
            return len(MIGRATIONS)

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def check_writable(self) -> None:
        """Raise if the database cannot take a write: a no-op UPDATE in a transaction that is rolled back (a
        read-only SQLite file or a read-only PostgreSQL replica refuses it)."""
        with self.engine.connect() as conn:
            with conn.begin() as tx:
                conn.execute(update(schema_version).values(version=schema_version.c.version))
                tx.rollback()

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    # --- datasets -----------------------------------------------------------------------------------------------
    def create_dataset(self, dataset_id: str, name: str) -> dict[str, Any]:
        """Record a new dataset."""
        row = {"id": dataset_id, "name": name, "created_at": time.time()}
        with self.engine.begin() as conn:
            conn.execute(insert(datasets).values(**row))
        return row

    def list_datasets(self) -> list[dict[str, Any]]:
        """All datasets, newest first."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(datasets).order_by(datasets.c.created_at.desc()))
            return [dict(r._mapping) for r in rows]

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        """One dataset, or None."""
        with self.engine.begin() as conn:
            row = conn.execute(select(datasets).where(datasets.c.id == dataset_id)).first()
            return dict(row._mapping) if row else None

    # --- jobs ---------------------------------------------------------------------------------------------------
    def create_job(self, job_id: str, name: str, config_yaml: str, dataset_id: str | None = None) -> dict[str, Any]:
        """Queue a job."""
        row = {
            "id": job_id, "name": name, "state": "queued", "config_yaml": config_yaml, "dataset_id": dataset_id,
            "created_at": time.time(), "attempts": 0, "cancel_requested": False,
        }
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(**row))
        return self.get_job(job_id)  # type: ignore[return-value]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """One job, or None."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
            return dict(row._mapping) if row else None

    def list_jobs(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Jobs, newest first (without their config text)."""
        cols = [c for c in jobs.c if c.name != "config_yaml"]
        query = select(*cols).order_by(jobs.c.created_at.desc(), jobs.c.id).limit(limit)
        if state:
            query = query.where(jobs.c.state == state)
        with self.engine.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def count_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zeros included)."""
        counts = dict.fromkeys(STATES, 0)
        with self.engine.begin() as conn:
            for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)):
                counts[state] = n
        return counts

    def claim_next(self, worker: str) -> dict[str, Any] | None:
        """Atomically move the oldest queued job to running for ``worker``; None if the queue is empty."""
        while True:
            with self.engine.begin() as conn:
                query = select(jobs.c.id).where(jobs.c.state == "queued").order_by(jobs.c.created_at, jobs.c.id).limit(1)
                if self.is_postgres:  # skip rows another server is claiming right now instead of waiting on them
                    query = query.with_for_update(skip_locked=True)
                job_id = conn.execute(query).scalar()
                if job_id is None:
                    return None
                won = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.state == "queued")
                    .values(state="running", worker=worker, started_at=time.time(), finished_at=None,
                            attempts=jobs.c.attempts + 1, pid=None, proc_start=None, exit_code=None, error=None)
                ).rowcount
            if won == 1:
                return self.get_job(job_id)
            # another runner took it between our SELECT and UPDATE: try the next one

    def set_process(self, job_id: str, pid: int, proc_start: str | None) -> None:
        """Record the trainer process of a running job."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(pid=pid, proc_start=proc_start))

    def finish(self, job_id: str, worker: str, state: str, exit_code: int | None, error: str | None = None) -> bool:
        """Record the end of a running job claimed by ``worker``; False if it was not (any longer) ours."""
        assert state in FINAL_STATES
        with self.engine.begin() as conn:
            return conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == "running", jobs.c.worker == worker)
                .values(state=state, exit_code=exit_code, error=error, finished_at=time.time(), cancel_requested=False)
            ).rowcount == 1

    def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued job at once; ask the runner of a running job to stop it (SIGTERM). None if unknown."""
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued")
                         .values(state="cancelled", finished_at=time.time()))
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running")
                         .values(cancel_requested=True))
        return self.get_job(job_id)

    def cancel_requested(self, worker: str) -> list[str]:
        """Ids of ``worker``'s running jobs whose cancel was requested."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.worker == worker, jobs.c.state == "running",
                                                        jobs.c.cancel_requested.is_(True)))
            return [r[0] for r in rows]

    def resume(self, job_id: str) -> bool:
        """Queue a cancelled or failed job again (the trainer continues from its latest checkpoint)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(("cancelled", "failed")))
                .values(state="queued", finished_at=None, cancel_requested=False, exit_code=None, error=None)
            ).rowcount == 1

    def running_jobs(self, worker: str) -> list[dict[str, Any]]:
        """Jobs recorded as running by ``worker`` (after a crash: the ones a dead server left behind)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.worker == worker, jobs.c.state == "running"))
            return [dict(r._mapping) for r in rows]

    def requeue(self, job_id: str, worker: str) -> bool:
        """Put ``worker``'s running job back in the queue (it resumes from its latest checkpoint when claimed)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running", jobs.c.worker == worker)
                .values(state="queued", pid=None, proc_start=None)
            ).rowcount == 1

    # --- workers (host failure) ---------------------------------------------------------------------------------
    def heartbeat(self, worker: str) -> None:
        """Record that ``worker`` is alive: bump its beat count (creating its row on the first beat)."""
        now = time.time()
        with self.engine.begin() as conn:
            bumped = conn.execute(update(workers).where(workers.c.id == worker)
                                  .values(beats=workers.c.beats + 1, heartbeat_at=now)).rowcount
            if not bumped:
                conn.execute(insert(workers).values(id=worker, beats=1, heartbeat_at=now, started_at=now))

    def worker_beats(self) -> dict[str, int]:
        """Every beating worker that holds a running job, with its beat count. Workers that never beat are left
        out: the kubernetes runner, whose Jobs outlive it (the cluster reschedules them), and servers from before
        heartbeats existed (they recover their own jobs when restarted)."""
        with self.engine.begin() as conn:
            holders = {r[0] for r in conn.execute(select(jobs.c.worker).where(jobs.c.state == "running").distinct())}
            beats = dict(conn.execute(select(workers.c.id, workers.c.beats)).all())
        return {w: beats[w] for w in holders if w in beats}

    def list_workers(self) -> list[dict[str, Any]]:
        """All workers that ever beat, most recent beat first."""
        with self.engine.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(select(workers).order_by(workers.c.heartbeat_at.desc()))]

    def take_over(self, dead_worker: str, beats: int) -> list[str]:
        """Requeue the running jobs of ``dead_worker`` if its beat count is still ``beats`` (it did not come back
        in the meantime); return the ids this call requeued. Safe when several survivors try at once."""
        taken = []
        with self.engine.begin() as conn:
            query = select(workers.c.beats).where(workers.c.id == dead_worker)
            if self.is_postgres:  # hold its row: a late heartbeat waits for this decision, then counts again
                query = query.with_for_update()
            if conn.execute(query).scalar() != beats:
                return []
            ids = [r[0] for r in conn.execute(select(jobs.c.id).where(jobs.c.worker == dead_worker,
                                                                       jobs.c.state == "running"))]
            for job_id in ids:
                if conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == "running",
                                                   jobs.c.worker == dead_worker)
                                .values(state="queued", worker=None, pid=None, proc_start=None)).rowcount:
                    taken.append(job_id)
        return taken

    def still_ours(self, worker: str, job_ids: list[str]) -> set[str]:
        """Which of ``job_ids`` are still running under ``worker`` (the rest were taken over)."""
        if not job_ids:
            return set()
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs.c.id).where(jobs.c.id.in_(job_ids), jobs.c.worker == worker,
                                                        jobs.c.state == "running"))
            return {r[0] for r in rows}
