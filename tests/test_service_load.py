"""Load: 500 submissions from 20 concurrent clients to two servers sharing one database; none lost, none run twice.

The runners run a trivial command that records its job id, so the test measures the queue, not training. The
figures are printed (``pytest -s``) for the README; nothing here asserts on time.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .service_helpers import AUTH, RECORD_COMMAND, ServerProcess, database_url, wait_for

pytest.importorskip("fastapi")

SUBMISSIONS, CLIENTS = 500, 20


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_db(request, tmp_path):
    yield from database_url(request.param, tmp_path / "home" / "service.db")


def test_500_submissions_20_clients_two_servers(tmp_path, shared_db):
    home = tmp_path / "home"
    home.mkdir()
    servers = [ServerProcess(home, db=shared_db, command=RECORD_COMMAND, extra=["--slots", "4"]) for _ in range(2)]
    try:
        t0 = time.monotonic()

        def client_work(c: int) -> list[str]:
            ids = []
            with httpx.Client(base_url=servers[c % 2].url, timeout=120) as http:
                for i in range(c, SUBMISSIONS, CLIENTS):
                    res = http.post("/api/jobs", headers=AUTH, json={
                        "name": f"load-{i}", "config": {"base_model": "models/m", "train_data_dir": "datasets/d"}})
                    assert res.status_code == 201, res.text
                    ids.append(res.json()["id"])
            return ids

        with ThreadPoolExecutor(CLIENTS) as pool:
            submitted = [i for ids in pool.map(client_work, range(CLIENTS)) for i in ids]
        t_submitted = time.monotonic() - t0
        ran_file = home / "ran.txt"

        def all_done():
            jobs = servers[0].client.get("/api/jobs", params={"limit": 10_000}, headers=AUTH).json()
            return jobs if sum(j["state"] == "succeeded" for j in jobs) == SUBMISSIONS else None

        jobs = wait_for(all_done, "all jobs to finish", timeout=600, interval=0.5)
        wall = time.monotonic() - t0
        ran = Counter(ran_file.read_text().split())
        workers = Counter(j["worker"] for j in jobs)
        lost = set(submitted) - set(ran)
        duplicates = {k: n for k, n in ran.items() if n > 1}
        print(f"\nload test ({shared_db.split(':')[0]}): {len(submitted)} submissions from {CLIENTS} clients to "
              f"2 servers; lost {len(lost)}, run twice {len(duplicates)}; submitted in {t_submitted:.1f} s, all "
              f"finished in {wall:.1f} s; jobs per server {sorted(workers.values())}", file=sys.stderr)
        assert len(submitted) == len(set(submitted)) == SUBMISSIONS
        assert not lost and not duplicates and set(ran) == set(submitted)
        assert all(j["attempts"] == 1 for j in jobs)
        assert len(workers) == 2  # both servers ran jobs
        metrics = servers[1].client.get("/metrics").text
        assert f'lora_jobs{{state="succeeded"}} {SUBMISSIONS}.0' in metrics and "lora_queue_length 0.0" in metrics
    finally:
        for server in servers:
            server.stop()
