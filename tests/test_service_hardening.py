"""Regression tests of issue 15, each a defect found by trying the service as a hostile user would: reads without
the token, DNS rebinding, host files and other jobs' outputs within reach, 500s from client input, a finished job
stuck in ``running``, unbounded metric labels, spooled oversize bodies."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from .service_helpers import AUTH, TOKEN, RECORD_COMMAND, wait_for, wait_job, zip_bytes
from .test_service_api import png_bytes

pytest.importorskip("fastapi")


def client_for(home: Path, base_url: str = "http://localhost", **settings):
    """A TestClient that answers a server error as a 500 response (as a real server does) instead of raising."""
    from fastapi.testclient import TestClient

    from lora_scripts.service.app import ServiceSettings, create_app

    app = create_app(ServiceSettings(home=home, token=TOKEN, poll_seconds=0.05, **settings))
    return TestClient(app, base_url=base_url, raise_server_exceptions=False)


@pytest.fixture()
def service(tmp_path):
    with client_for(tmp_path / "home", run_jobs=False) as client:
        client.home = (tmp_path / "home").resolve()
        client.dataset = client.post("/api/datasets", json={"name": "d"}, headers=AUTH).json()["id"]
        client.job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir":
                                                               "datasets/d"}}, headers=AUTH).json()["id"]
        yield client


# --- 1. reads need the token; Host checked; sign-in by POST ------------------------------------------------------
READS = ["/api/jobs", "/api/jobs/{job}", "/api/jobs/{job}/config", "/api/jobs/{job}/log", "/api/jobs/{job}/loss",
         "/api/jobs/{job}/artifacts", "/api/jobs/{job}/artifacts/x.safetensors", "/api/datasets",
         "/api/datasets/{dataset}", "/api/datasets/{dataset}/files/a.png", "/metrics"]


@pytest.mark.parametrize("path", READS)
def test_every_read_needs_the_token_on_loopback(service, path):
    url = path.format(job=service.job, dataset=service.dataset)
    assert service.get(url).status_code == 401
    assert service.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert service.get(url, headers=AUTH).status_code in (200, 404)
    service.cookies.set("lora_token", TOKEN)  # the console's cookie is enough to read
    try:
        assert service.get(url).status_code in (200, 404)
    finally:
        service.cookies.clear()


def test_only_probes_sign_in_and_static_files_are_open(service):
    for path in ("/healthz", "/readyz", "/login", "/static/console.css"):
        assert service.get(path).status_code == 200, path
    assert service.get("/").status_code == 401 and "Sign in" in service.get("/").text


@pytest.mark.parametrize("bind,host,allowed,ok", [
    ("127.0.0.1", "localhost:7860", [], True),
    ("127.0.0.1", "127.0.0.1:7860", [], True),
    ("127.0.0.1", "[::1]:7860", [], True),
    ("127.0.0.1", "rebind.attacker.example:7860", [], False),  # a page whose name now resolves to 127.0.0.1
    ("127.0.0.1", "10.0.0.5", [], False),
    ("127.0.0.1", "lora.example.com", ["lora.example.com"], True),
    ("127.0.0.1", "a.lora.example.com", ["*.lora.example.com"], True),
    ("0.0.0.0", "10.0.0.5:7860", [], True),  # kubelet and other pods use the pod IP
    ("0.0.0.0", "evil.example", [], False),
])
def test_host_header_is_checked(tmp_path, bind, host, allowed, ok):
    with client_for(tmp_path / "home", run_jobs=False, host=bind, allowed_hosts=allowed) as client:
        res = client.get("/api/jobs", headers={**AUTH, "Host": host})
        assert res.status_code == (200 if ok else 400), res.text
        if not ok:
            assert "--allowed-host" in res.json()["detail"]
        assert client.get("/healthz", headers={"Host": host}).status_code == 200  # probes answer any Host


def test_sign_in_is_a_post_and_the_token_never_in_a_url(service):
    res = service.get(f"/login?token={TOKEN}", follow_redirects=False)
    assert res.status_code == 200 and "lora_token" not in res.headers.get("set-cookie", "")
    assert 'method="post"' in res.text and 'method="get"' not in res.text
    assert service.post("/login", data={"token": "wrong"}).status_code == 403
    res = service.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert res.status_code == 303 and "lora_token=" in res.headers["set-cookie"]
    assert TOKEN not in res.headers["location"]


# --- 2. what a job can touch -----------------------------------------------------------------------------------
def _read_keys() -> list[str]:
    from lora_scripts.service.job_paths import JOB_WRITABLE, SERVICE_OWNED, path_keys

    return [".".join(k) for k in path_keys() if k[-1] not in SERVICE_OWNED + JOB_WRITABLE]


def _nest(key: str, value) -> dict:
    parts = key.split(".")
    out = value
    for part in reversed(parts):
        out = {part: out}
    return out


def test_path_keys_are_found_from_the_schema():
    keys = _read_keys()
    for key in ("train_data_dir", "metadata_path", "base_model", "base_model_config", "network_weights", "val_data"):
        assert key in keys


@pytest.mark.parametrize("key", _read_keys())
@pytest.mark.parametrize("value", ["/etc", "/proc/self/environ", "../../etc/passwd", "datasets/../../x"])
def test_every_path_key_is_confined(service, key, value):
    """Every path-valued key of the schema (a key a new model family adds too) is refused outside the home's
    datasets and models, at submission, naming the key."""
    config = {"base_model": "models/m", "train_data_dir": "datasets/d", **_nest(key, value)}
    res = service.post("/api/jobs", json={"config": config}, headers=AUTH)
    assert res.status_code == 422, res.text
    assert ["body", "config", *key.split(".")] in [e["loc"] for e in res.json()["detail"]]
    assert len(service.get("/api/jobs", headers=AUTH).json()) == 1  # only the fixture's job


@pytest.mark.parametrize("key", ["image_dir", "mask_dir", "metadata_path"])
def test_paths_inside_a_list_of_subsets_are_confined(service, key):
    """``datasets:`` is a list of sections: each subset's paths are checked, naming the subset by its index."""
    subsets = [{"image_dir": "datasets/d"}, {"image_dir": "datasets/d", key: "/etc"}]
    res = service.post("/api/jobs", json={"config": {"base_model": "models/m", "datasets": subsets}}, headers=AUTH)
    assert res.status_code == 422, res.text
    assert [e["loc"] for e in res.json()["detail"]] == [["body", "config", "datasets", "1", key]]
    assert len(service.get("/api/jobs", headers=AUTH).json()) == 1  # only the fixture's job


def test_metadata_of_host_files_never_reaches_the_trainer(service):
    """The reported leak: /etc as data and /proc/self/environ as captions."""
    res = service.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "/etc",
                                                     "metadata_path": "/proc/self/environ"}}, headers=AUTH)
    assert res.status_code == 422
    assert {tuple(e["loc"][-1:]) for e in res.json()["detail"]} == {("train_data_dir",), ("metadata_path",)}


def test_symlinks_are_resolved_before_the_check(service):
    os.symlink("/etc", service.home / "datasets" / "etc-link")
    res = service.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/etc-link"}},
                       headers=AUTH)
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "config", "train_data_dir"]


def test_model_root_and_hub_ids(tmp_path):
    models = tmp_path / "shared-models"
    (models / "sd").mkdir(parents=True)
    with client_for(tmp_path / "home", run_jobs=False, model_roots=[models]) as client:
        for base in (str(models / "sd"), "org/some-model"):
            res = client.post("/api/jobs/validate", json={"config": {"base_model": base,
                                                                     "train_data_dir": "datasets/d"}}, headers=AUTH)
            assert res.status_code == 200, res.text
            assert res.json()["config"]["base_model"] == base


def test_a_job_cannot_reach_another_jobs_output(service):
    """The reported overwrite: output_dir ../<other job>/output with the same output_name."""
    for key, value in (("output_dir", f"../{service.job}/output"), ("cache_dir", f"../{service.job}/output")):
        res = service.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d",
                                                         key: value}}, headers=AUTH)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "config", key]
    res = service.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}},
                       headers=AUTH).json()
    assert res["id"] != service.job
    import yaml

    outputs = {yaml.safe_load(service.get(f"/api/jobs/{j}/config", headers=AUTH).text)["output_dir"]
               for j in (res["id"], service.job)}
    assert outputs == {str(service.home / "jobs" / j / "output") for j in (res["id"], service.job)}


def test_trainer_errors_quote_only_a_short_excerpt(tmp_path):
    from lora_scripts.service.runner import sanitise_error, trainer_error

    secret = "AWS_SECRET_ACCESS_KEY=" + "x" * 500
    text = sanitise_error(f"metadata.csv line 1: bad header '{secret}\x00\x1b[31m'; expected filename,prompt")
    assert "x" * 41 not in text and "\x00" not in text and "\x1b" not in text and len(text) <= 300
    assert text.endswith("expected filename,prompt")
    log = tmp_path / "train.log"
    log.write_text(f"step 1\nerror: {'y' * 5000}\n")
    assert len(trainer_error(log, 2)) <= 300


# --- 3. no 500 from client input -------------------------------------------------------------------------------
def upload(client, name, data):
    return client.post(f"/api/datasets/{client.dataset}/files", files=[("files", (name, data, "application/zip"))],
                       headers=AUTH)


def _bad_crc_zip() -> bytes:
    data = bytearray(zip_bytes({"a.txt": b"a caption that is long enough to find"}))
    at = data.find(b"a caption")
    data[at] ^= 0xFF  # stored entry: flip a byte of the content, the CRC no longer matches
    return bytes(data)


def _encrypted_zip() -> bytes:
    data = bytearray(zip_bytes({"a.txt": b"caption"}))
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the "encrypted" flag in both headers
        at = data.find(sig)
        data[at + offset] |= 0x1
    return bytes(data)


def _unsupported_method_zip() -> bytes:
    data = bytearray(zip_bytes({"a.txt": b"caption"}))
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # method field in the local and the central header
        at = data.find(sig)
        offset = 8 if sig == b"PK\x03\x04" else 10
        data[at + offset:at + offset + 2] = (99).to_bytes(2, "little")  # AE-x encryption, which zipfile lacks
    return bytes(data)


@pytest.mark.parametrize("make", [_bad_crc_zip, _encrypted_zip, _unsupported_method_zip,
                                  lambda: b"PK\x03\x04 truncated"])
def test_broken_zips_are_refused_not_500(service, make):
    res = upload(service, "set.zip", make())
    assert res.status_code in (415, 422), res.text
    assert "set.zip" in res.json()["detail"][0]["msg"]
    assert list((service.home / "datasets" / service.dataset).iterdir()) == []


def test_too_long_names_are_422_not_500(service):
    long = "a" * 300
    res = service.post("/api/jobs", json={"config": {"base_model": long, "train_data_dir": "datasets/d"}},
                       headers=AUTH)
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "config", "base_model"]
    res = service.post(f"/api/datasets/{service.dataset}/label", json={"backend": "caption", "model": long},
                       headers=AUTH)
    assert res.status_code == 422, res.text
    res = service.put(f"/api/datasets/{service.dataset}/captions", json={"captions": {long + ".png": "x"}},
                      headers=AUTH)
    assert res.status_code == 422, res.text


def test_caption_backend_without_a_model_fails_at_once(service):
    res = service.post(f"/api/datasets/{service.dataset}/label", json={"backend": "caption"}, headers=AUTH)
    assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "model"]


def test_disk_full_upload_is_507(service, monkeypatch):
    import lora_scripts.service.routes_datasets as routes

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(routes, "write_new_file", full)
    res = service.post(f"/api/datasets/{service.dataset}/files", files=[("files", ("a.png", png_bytes(), "image/png"))],
                       headers=AUTH)
    assert res.status_code == 507 and "disk is full" in res.json()["detail"]


def test_oversize_body_is_refused_before_it_is_spooled(tmp_path, monkeypatch):
    """Content-Length over the limit, and a chunked body without one, are refused before the multipart parser
    writes a byte to a temporary file."""
    import starlette.formparsers as formparsers

    from lora_scripts.service.security import UploadLimits

    spooled = []
    real = formparsers.SpooledTemporaryFile
    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", lambda *a, **k: spooled.append(1) or real(*a, **k))
    limits = UploadLimits(max_file_bytes=1000, max_total_bytes=1000)
    with client_for(tmp_path / "home", run_jobs=False, limits=limits) as client:
        ds = client.post("/api/datasets", json={"name": "d"}, headers=AUTH).json()["id"]
        big = b"\0" * (3 * 2**20)
        res = client.post(f"/api/datasets/{ds}/files", files=[("files", ("a.png", big, "image/png"))], headers=AUTH)
        assert res.status_code == 413

        def chunks():
            for _ in range(48):
                yield b"x" * 65536

        res = client.post(f"/api/datasets/{ds}/files", content=chunks(), headers={
            **AUTH, "Content-Type": "multipart/form-data; boundary=b"})
        assert res.status_code == 413
    assert spooled == []


# --- 4. job state never lost -----------------------------------------------------------------------------------
def test_runner_keeps_a_finished_job_until_its_result_is_stored(tmp_path, monkeypatch):
    """The database refuses the result write (a full disk): the job must not be forgotten while running; once the
    store takes writes again it is recorded, and /readyz says not ready meanwhile."""
    from lora_scripts.service.store import JobStore

    failing = {"on": True}
    real_finish = JobStore.finish

    def finish(self, *args, **kwargs):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "database or disk is full")
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish", finish)
    with client_for(tmp_path / "home", train_command=RECORD_COMMAND) as client:
        job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}},
                          headers=AUTH).json()
        wait_for(lambda: (tmp_path / "home" / "ran.txt").exists(), "the fake trainer")
        ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 503 and r.json(), "not ready", 30)
        assert any("job result" in p for p in ready["problems"])
        assert client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()["state"] == "running"
        failing["on"] = False
        assert wait_job(client, job["id"], timeout=30)["state"] == "succeeded"
        wait_for(lambda: client.get("/readyz").status_code == 200, "ready again", 30)


def test_readyz_reports_an_unwritable_home_or_database(service, monkeypatch):
    import lora_scripts.service.app as app_module

    def read_only(home):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(app_module, "probe_home", read_only)
    res = service.get("/readyz")
    assert res.status_code == 503 and res.json()["problems"] == ["home: Read-only file system"]
    monkeypatch.undo()
    store = service.app.state.service.store
    monkeypatch.setattr(store, "check_writable", lambda: (_ for _ in ()).throw(RuntimeError("read-only")))
    assert service.get("/readyz").json()["problems"] == ["database: RuntimeError"]


def test_a_trainer_dying_on_a_full_disk_says_so(tmp_path):
    command = [sys.executable, "-c", "import sys; print('Traceback ...'); print('OSError: [Errno 28] No space left "
               "on device: checkpoint'); sys.exit(1)"]
    with client_for(tmp_path / "home", train_command=command) as client:
        job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}},
                          headers=AUTH).json()
        done = wait_job(client, job["id"], timeout=60)
    assert done["state"] == "failed" and done["error"].startswith("the disk is full")


# --- 5. bounded metrics ----------------------------------------------------------------------------------------
def test_unknown_methods_share_one_metric_label(service):
    for i in range(20):
        service.request(f"X{i}", "/api/jobs")
    text = service.get("/metrics", headers=AUTH).text
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("lora_http_requests_total{")}
    assert methods <= {"GET", "POST", "other"} and "other" in methods
    routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("lora_http_requests_total{")}
    assert all(r == "unmatched" or r.startswith("/") and service.job not in r for r in routes)


class LiveServer:
    """The app under uvicorn in a thread of this process, on a free loopback port (real sockets, real streams)."""

    def __init__(self, home: Path, **settings) -> None:
        import threading

        import uvicorn

        from lora_scripts.service.app import ServiceSettings, create_app

        from .service_helpers import free_port

        self.port = free_port()
        app = create_app(ServiceSettings(home=home, token=TOKEN, run_jobs=False, port=self.port, **settings))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start", 30)
        self.url = f"http://127.0.0.1:{self.port}"

    def threads_in_use(self) -> int:
        """Worker threads of the server's pool borrowed right now (sync routes, file reads, old sync streams)."""
        import asyncio

        import anyio.to_thread

        async def borrowed() -> int:
            return anyio.to_thread.current_default_thread_limiter().borrowed_tokens

        loop = self.server.servers[0].get_loop()
        return asyncio.run_coroutine_threadsafe(borrowed(), loop).result(10)

    def stop(self) -> float:
        """Ask it to stop as SIGTERM does; return the seconds it took."""
        import time

        start = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the server did not stop"
        return time.monotonic() - start


def test_many_log_followers_hold_no_worker_thread(tmp_path):
    """45 clients following a queued job's log (it never ends): other routes still answer at once, and the server
    stops promptly (the old sync generator slept in a worker thread each and hung every route and SIGTERM)."""
    import httpx

    server = LiveServer(tmp_path / "home", max_streams=60)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}).json()
    followers = [httpx.Client(base_url=server.url, headers=AUTH, timeout=30) for _ in range(45)]
    streams = []
    try:
        for c in followers:
            stream = c.stream("GET", f"/api/jobs/{job['id']}/log", params={"follow": "true"})
            res = stream.__enter__()
            assert res.status_code == 200
            streams.append(stream)
        import time

        busy = []
        for _ in range(10):  # over two polls of every follower
            busy.append(server.threads_in_use())
            time.sleep(0.1)
        assert max(busy) < 10, busy  # a sleeping follower holds none (it was one each, up to the pool's 40)
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=5) as client:
            for _ in range(5):  # sync routes run in the thread pool: it must not be taken by the followers
                assert client.get("/api/jobs").status_code == 200
                assert client.get(f"/api/jobs/{job['id']}").status_code == 200
    finally:
        took = server.stop()
        for c in followers:
            c.close()
    assert took < 30


def test_log_streams_per_token_are_limited(tmp_path):
    import httpx

    server = LiveServer(tmp_path / "home", max_streams=2)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            job = client.post("/api/jobs", json={"config": {"base_model": "models/m",
                                                            "train_data_dir": "datasets/d"}}).json()
            url = f"/api/jobs/{job['id']}/log?follow=true"
            with client.stream("GET", url) as first, client.stream("GET", url) as second:
                assert first.status_code == second.status_code == 200
                third = client.get(url)
                assert third.status_code == 429 and "at most 2" in third.json()["detail"]
            # closed streams give their places back
            streams = server.server.config.app.state.service.streams
            wait_for(lambda: streams.get(TOKEN, 0) == 0, "the streams to be released", 10)
            assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
            assert client.get(url).status_code == 200  # a finished job's stream ends by itself
    finally:
        server.stop()


# --- 6. console ------------------------------------------------------------------------------------------------
def test_job_form_preselects_the_dataset_it_was_filled_for(tmp_path):
    defaults = {"name": "demo", "dataset_id": "demo-shapes", "text": {"base_model": "models/tiny-llama"}}
    with client_for(tmp_path / "home", run_jobs=False, form_defaults=defaults) as client:
        client.cookies.set("lora_token", TOKEN)
        store = client.app.state.service.store
        store.create_dataset("demo-shapes", "shapes (demo)")
        store.create_dataset("newer", "uploaded later")  # the newest: it used to be preselected
        form = client.get("/jobs/new").text
        assert '<option value="demo-shapes" selected>' in form and '<option value="newer" >' in form
        assert '<option value="newer" selected>' in client.get("/jobs/new?dataset=newer").text
        assert 'name="task"' in form and 'data-task="text"' in form and "models/tiny-llama" in form


def test_sidecar_captions_are_counted(service):
    files = [("files", ("a.png", png_bytes(), "image/png")), ("files", ("a.txt", b"a red square", "text/plain")),
             ("files", ("b.png", png_bytes((0, 9, 200)), "image/png"))]
    res = service.post(f"/api/datasets/{service.dataset}/files", files=files, headers=AUTH).json()["dataset"]
    assert (res["captioned"], res["sidecar_only"]) == (1, 0)  # no metadata.csv: the trainer reads the sidecars
    service.put(f"/api/datasets/{service.dataset}/captions", json={"captions": {"b.png": "blue"}}, headers=AUTH)
    res = service.get(f"/api/datasets/{service.dataset}", headers=AUTH).json()
    assert (res["captioned"], res["sidecar_only"]) == (1, 1)  # metadata.csv now wins: the console says so


def test_remote_code_jobs_need_the_operators_flag(tmp_path):
    """trust_remote_code: true runs a model folder's Python with the service's permissions: refused (422, one line
    naming the key and the flag) unless the server was started with --allow-remote-code; a job queued while it was
    allowed cannot be resumed after a restart without it."""
    import yaml

    body = {"config_yaml": "task: text\ntrust_remote_code: yes\n",
            "config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}
    home = tmp_path / "home"
    with client_for(home, run_jobs=False) as client:
        for path in ("/api/jobs/validate", "/api/jobs"):
            res = client.post(path, json=body, headers=AUTH)
            assert res.status_code == 422, res.text
            [error] = res.json()["detail"]
            assert error["loc"] == ["body", "config", "trust_remote_code"] and "\n" not in error["msg"]
            assert "--allow-remote-code" in error["msg"]
        assert client.get("/api/jobs", headers=AUTH).json() == []
        assert client.post("/api/jobs/validate", json={**body, "config_yaml": "task: text\n"},
                           headers=AUTH).status_code == 200
    with client_for(home, run_jobs=False, allow_remote_code=True) as client:
        res = client.post("/api/jobs", json=body, headers=AUTH)
        assert res.status_code == 201, res.text
        job = res.json()["id"]
        assert yaml.safe_load(client.get(f"/api/jobs/{job}/config", headers=AUTH).text)["trust_remote_code"] is True
        assert client.post(f"/api/jobs/{job}/cancel", headers=AUTH).json()["state"] == "cancelled"
    with client_for(home, run_jobs=False) as client:
        res = client.post(f"/api/jobs/{job}/resume", headers=AUTH)
        assert res.status_code == 422 and "--allow-remote-code" in res.json()["detail"]
        assert client.get(f"/api/jobs/{job}", headers=AUTH).json()["state"] == "cancelled"
