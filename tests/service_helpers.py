"""Helpers for the service tests: an in-process app, a real server subprocess, waiting for job states."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import httpx

from .helpers import cli_env

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PG_URL = os.environ.get("LORA_SCRIPTS_TEST_PG_URL")
PG_SKIP_REASON = ("LORA_SCRIPTS_TEST_PG_URL is not set (.ci/run starts a PostgreSQL cluster and sets it; or point "
                  "it at an empty database: postgresql://user@host/db)")
FINAL = ("succeeded", "failed", "cancelled")

# a fake trainer for tests of the queue itself: records its job id (one line per run) and exits
RECORD_COMMAND = [sys.executable, "-S", "-c",
                  "import os,sys; f=open(sys.argv[1],'a'); f.write(os.environ['LORA_SCRIPTS_JOB_ID']+'\\n')",
                  "{home}/ran.txt"]


def database_url(kind: str, sqlite_file: Path):
    """Yield a fresh database URL of ``kind``: a SQLite file, or (skipping without LORA_SCRIPTS_TEST_PG_URL) a URL
    whose connections use a new, empty PostgreSQL schema, dropped afterwards. For ``yield from`` in a fixture."""
    if kind == "sqlite":
        yield f"sqlite:///{sqlite_file}"
        return
    if not PG_URL:
        import pytest

        pytest.skip(PG_SKIP_REASON)
    import sqlalchemy

    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def start_reference_run(config: dict, path: Path) -> subprocess.Popen:
    """Start an uninterrupted ``lora-scripts train`` of ``config`` (written to ``path``) beside a service test."""
    import yaml

    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([sys.executable, "-m", "lora_scripts.cli", "train", "--config", str(path), "--no-progress"],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, what: str, timeout: float = 300.0, interval: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout`` seconds. A generous
    limit against hangs, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_job(client, job_id: str, states=FINAL, timeout: float = 300.0) -> dict:
    """Wait until the job is in one of ``states``; return it."""
    def check():
        job = client.get(f"/api/jobs/{job_id}", headers=AUTH).json()
        return job if job["state"] in states else None

    return wait_for(check, f"job {job_id} to reach {states}", timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zip_bytes(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    """A zip holding ``entries`` (name -> bytes) and symlink entries (name -> target)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, target)
    return buf.getvalue()


class ServerProcess:
    """``lora-scripts serve`` as a subprocess on a free loopback port."""

    def __init__(self, home: Path, db: str | None = None, port: int | None = None, command: list[str] | None = None,
                 extra: list[str] | None = None) -> None:
        self.home, self.port = home, port or free_port()
        argv = [sys.executable, "-m", "lora_scripts.cli", "serve", "--home", str(home), "--port", str(self.port),
                "--token", TOKEN, *(["--db", db] if db else []), *(extra or [])]
        env = cli_env()
        env["LORA_SCRIPTS_RUNNER_POLL"] = "0.2"
        if command:
            env["LORA_SCRIPTS_TRAIN_COMMAND"] = json.dumps(command)
        self.log = open(home.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=AUTH)  # every API read needs the token
        wait_for(self._ready, f"server on port {self.port}", timeout=120)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: "
                                 + Path(self.log.name).read_text(errors="replace")[-2000:])
        try:
            return self.client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self.log.close()
