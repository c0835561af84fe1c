"""The runner's recovery after a crash, and the metrics of a running job."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .service_helpers import AUTH
from .test_service_api import make_client

pytest.importorskip("sqlalchemy")


def sleeper() -> subprocess.Popen:
    """A stand-in for a trainer left behind by a dead server: own session, ignores nothing."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)


def test_recovery_stops_a_leftover_trainer_and_requeues(tmp_path):
    from lora_scripts.service.runner import Runner, process_start_time
    from lora_scripts.service.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'db'}")
    store.migrate()
    for job_id in ("alive", "gone", "other", "queued"):
        store.create_job(job_id, job_id, "x: 1")
    orphan = sleeper()
    assert store.claim_next("me")["id"] == "alive"
    store.set_process("alive", orphan.pid, process_start_time(orphan.pid))
    assert store.claim_next("me")["id"] == "gone"
    store.set_process("gone", 2**22 - 5, "1")  # a trainer that no longer exists
    assert store.claim_next("someone-else")["id"] == "other"
    recovered = Runner(store, tmp_path, "me", slots=1).recover()
    assert sorted(recovered) == ["alive", "gone"]
    assert orphan.wait(timeout=60) is not None  # it was stopped (SIGTERM) before its job was requeued
    states = {j["id"]: j["state"] for j in store.list_jobs()}
    assert states == {"alive": "queued", "gone": "queued", "other": "running", "queued": "queued"}


def test_recovery_never_kills_a_reused_pid(tmp_path):
    from lora_scripts.service.runner import Runner, process_start_time
    from lora_scripts.service.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'db'}")
    store.migrate()
    store.create_job("a", "a", "x: 1")
    stranger = sleeper()
    try:
        store.claim_next("me")
        # the recorded pid now belongs to another process: its start time differs
        store.set_process("a", stranger.pid, str(int(process_start_time(stranger.pid)) - 1))
        assert Runner(store, tmp_path, "me", slots=1).recover() == ["a"]
        assert stranger.poll() is None  # untouched
    finally:
        stranger.kill()
        stranger.wait()


def test_metrics_of_a_running_job(tmp_path):
    home = tmp_path / "home"
    with make_client(home, run_jobs=False) as client:
        job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}, headers=AUTH).json()
        store = client.app.state.service.store
        assert store.claim_next("w")["id"] == job["id"]
        logs = home / "jobs" / job["id"] / "output" / "logs"
        logs.mkdir(parents=True)
        (logs / "loss.csv").write_text("step,epoch,loss,lr,elapsed_s,eval_loss\n1,1,0.9,0.001,2.00,\n"
                                       "2,1,0.5,0.001,3.50,\n4,1,0.25,0.001,6.50,\n")
        text = client.get("/metrics", headers=AUTH).text
        assert f'lora_job_step{{job="{job["id"]}"}} 4.0' in text
        assert f'lora_job_loss{{job="{job["id"]}"}} 0.25' in text
        assert f'lora_job_step_seconds{{job="{job["id"]}"}} 1.5' in text
        assert 'lora_jobs{state="running"} 1.0' in text
        store.finish(job["id"], "w", "failed", 1, "boom")
        text = client.get("/metrics", headers=AUTH).text
        assert "lora_jobs_failed 1.0" in text and "lora_job_loss{" not in text
        detail = client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()
        assert detail["error"] == "boom" and detail["step"] == 4 and detail["seconds_per_step"] == 1.5
