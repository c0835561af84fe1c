"""Host failure, piece by piece: heartbeats, taking over a silent worker's jobs exactly once, and a worker that was
only cut off killing the trainers of the jobs it lost."""

from __future__ import annotations

import sys
import time

import pytest

from .service_helpers import RECORD_COMMAND, database_url, wait_for
from .test_service_store import make_store

pytest.importorskip("sqlalchemy")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh store on SQLite, or on a schema of its own in the test PostgreSQL."""
    urls = database_url(request.param, tmp_path / "db")
    store = make_store(next(urls))
    yield store
    store.dispose()
    next(urls, None)  # drops the PostgreSQL schema


def test_survivors_racing_over_a_dead_workers_jobs_requeue_each_once(store):
    import threading

    from lora_scripts.service.store import JobStore

    store.heartbeat("dead")
    for i in range(40):
        store.create_job(f"j{i:02d}", "j", "x: 1")
        store.claim_next("dead")
    others = [JobStore(store.url) for _ in range(4)]
    taken: list[str] = []
    start = threading.Barrier(len(others))

    def take(survivor):
        start.wait()
        taken.extend(survivor.take_over("dead", 1))

    threads = [threading.Thread(target=take, args=(s,)) for s in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for other in others:
        other.dispose()
    assert sorted(taken) == [f"j{i:02d}" for i in range(40)]  # every job once, by whichever survivor won
    assert store.count_by_state()["queued"] == 40


def test_take_over_needs_an_unchanged_beat_count_and_happens_once(store):
    for job_id in ("a", "b", "c"):
        store.create_job(job_id, job_id, "x: 1")
    store.heartbeat("dead")
    store.claim_next("dead"), store.claim_next("dead")
    store.claim_next("alive")
    store.heartbeat("alive")
    assert store.worker_beats() == {"dead": 1, "alive": 1}
    store.heartbeat("dead")  # it beat again after we looked: not dead after all
    assert store.take_over("dead", 1) == []
    assert sorted(store.take_over("dead", 2)) == ["a", "b"]
    assert store.take_over("dead", 2) == []  # a second survivor finds nothing left to take
    states = {j["id"]: (j["state"], j["worker"]) for j in store.list_jobs()}
    assert states == {"a": ("queued", None), "b": ("queued", None), "c": ("running", "alive")}
    assert store.still_ours("alive", ["a", "c"]) == {"c"}


def test_a_worker_that_never_beats_is_never_taken_over(store):
    # the kubernetes runner: its Jobs go on without it and the cluster reschedules them; or a server from before
    # heartbeats, which recovers its own jobs when it starts again
    store.create_job("k8s", "k8s", "x: 1")
    store.claim_next("kubernetes")
    assert store.worker_beats() == {}
    assert store.take_over("kubernetes", 0) == [] and store.get_job("k8s")["state"] == "running"


def test_a_survivor_takes_over_a_silent_workers_job_after_one_lease(store, tmp_path):
    from lora_scripts.service.runner import Runner, job_dir

    store.create_job("j", "j", "x: 1")
    store.heartbeat("lost-host")
    store.claim_next("lost-host")
    job_dir(tmp_path, "j").mkdir(parents=True)
    survivor = Runner(store, tmp_path, "survivor", slots=1, command=RECORD_COMMAND, poll_seconds=0.05,
                      lease_seconds=1.0)
    started = time.monotonic()
    survivor.start()
    try:
        wait_for(lambda: store.get_job("j")["state"] == "succeeded", "the survivor to finish the job", timeout=60)
    finally:
        survivor.stop()
    assert time.monotonic() - started >= 1.0  # never before a whole lease without a beat
    job = store.get_job("j")
    assert job["worker"] == "survivor" and job["attempts"] == 2
    assert (tmp_path / "ran.txt").read_text() == "j\n"
    assert "worker lost-host sent no heartbeat for 1 s" in (job_dir(tmp_path, "j") / "train.log").read_text()


def test_a_live_worker_is_never_taken_over(store, tmp_path):
    from lora_scripts.service.runner import Runner

    busy = Runner(store, tmp_path, "busy", slots=1, poll_seconds=0.05, lease_seconds=0.6,
                  command=[sys.executable, "-c", "import time; time.sleep(3)"])
    watcher = Runner(store, tmp_path, "watcher", slots=1, poll_seconds=0.05, lease_seconds=0.6,
                     command=RECORD_COMMAND)
    store.create_job("long", "long", "x: 1")
    busy.start()
    wait_for(lambda: store.get_job("long")["state"] == "running", "busy to claim the job", timeout=30)
    watcher.start()
    try:
        wait_for(lambda: store.get_job("long")["state"] == "succeeded", "the job to finish", timeout=60)
    finally:
        watcher.stop()
        busy.stop()
    job = store.get_job("long")
    assert job["worker"] == "busy" and job["attempts"] == 1  # five leases long, never taken
    assert not (tmp_path / "ran.txt").exists()


def test_a_worker_cut_off_from_the_store_kills_the_trainer_of_a_job_it_lost(store, tmp_path):
    from lora_scripts.service.runner import Runner, job_dir

    store.create_job("j", "j", "x: 1")
    runner = Runner(store, tmp_path, "cut-off", slots=1, poll_seconds=0.05, lease_seconds=0.6,
                    command=[sys.executable, "-c", "import time; time.sleep(600)"])
    store.heartbeat("cut-off")
    runner.tick()  # claims and starts the trainer, without the heartbeat thread
    trainer = runner.running["j"].proc
    assert store.take_over("cut-off", 1) == ["j"]  # what a survivor does after a lease of silence
    assert store.claim_next("new-owner")["id"] == "j"
    time.sleep(runner.beat_seconds)
    runner.tick()
    assert "j" not in runner.running
    assert trainer.wait(timeout=30) == -9  # SIGKILL: no checkpoint racing the new owner's
    job = store.get_job("j")
    assert (job["state"], job["worker"]) == ("running", "new-owner")  # untouched by the worker that lost it
    assert "lost this job to another worker" in (job_dir(tmp_path, "j") / "train.log").read_text()
