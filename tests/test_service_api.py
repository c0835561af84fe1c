"""The REST API in-process (TestClient, SQLite): datasets, jobs, validation per field, cancel/resume, metrics, and
one real job that trains the tiny model through the CLI and is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from .helpers import assert_same_tensors
from .service_helpers import AUTH, RECORD_COMMAND, wait_for, wait_job

pytest.importorskip("fastapi")


def make_client(home: Path, **settings):
    from fastapi.testclient import TestClient

    from lora_scripts.service.app import ServiceSettings, create_app

    # the Host a browser on this machine sends: the server refuses names it does not serve (DNS rebinding)
    return TestClient(create_app(ServiceSettings(home=home, token="test-token", poll_seconds=0.1, **settings)),
                      base_url="http://localhost")


def png_bytes(colour=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_health_docs_and_console_pages(tmp_path):
    with make_client(tmp_path / "home") as client:
        assert client.get("/healthz").json() == {"ok": True}
        assert client.get("/readyz").json()["ready"] is True
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/api/jobs", "/api/jobs/{job_id}/cancel", "/api/jobs/{job_id}/resume", "/api/jobs/{job_id}/log",
                     "/api/jobs/{job_id}/artifacts/{path}", "/api/datasets/{dataset_id}/files",
                     "/api/datasets/{dataset_id}/label", "/api/datasets/{dataset_id}/captions",
                     "/api/datasets/{dataset_id}/check", "/metrics"):
            assert path in paths
        assert client.get("/").status_code == 401  # the console asks to sign in first
        client.cookies.set("lora_token", "test-token")
        assert "Jobs" in client.get("/").text
        assert 'id="job-form"' in client.get("/jobs/new").text
    token = (tmp_path / "home" / "token")
    assert not token.exists()  # a given token is not written; a generated one is (see test_service_security)


def test_dataset_upload_label_captions_check(tmp_path):
    with make_client(tmp_path / "home") as client:
        ds = client.post("/api/datasets", json={"name": "shapes"}, headers=AUTH).json()
        files = [("files", ("red_circle_01.png", png_bytes(), "image/png")),
                 ("files", ("blue_square.png", png_bytes((30, 30, 200)), "image/png")),
                 ("files", ("blue_square.txt", b"a blue square, sidecar", "text/plain"))]
        res = client.post(f"/api/datasets/{ds['id']}/files", files=files, headers=AUTH)
        assert res.status_code == 200, res.text
        assert res.json()["written"] == ["blue_square.png", "blue_square.txt", "red_circle_01.png"]
        thumb = client.get(f"/api/datasets/{ds['id']}/files/red_circle_01.png", headers=AUTH)
        assert thumb.status_code == 200 and thumb.content == png_bytes()

        res = client.post(f"/api/datasets/{ds['id']}/label", json={"backend": "filename", "trigger": "sks"},
                          headers=AUTH)
        assert res.status_code == 200, res.text
        captions = {i["name"]: i["caption"] for i in res.json()["dataset"]["images"]}
        assert captions == {"red_circle_01.png": "sks, red circle", "blue_square.png": "sks, blue square"}

        res = client.put(f"/api/datasets/{ds['id']}/captions", json={"captions": {"blue_square.png": "a blue, \"square\""}},
                         headers=AUTH)
        assert res.status_code == 200
        metadata = (tmp_path / "home" / "datasets" / ds["id"] / "metadata.csv").read_text()
        assert '"a blue, ""square"""' in metadata and "sks, red circle" in metadata
        res = client.put(f"/api/datasets/{ds['id']}/captions", json={"captions": {"ghost.png": "x"}}, headers=AUTH)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "captions", "ghost.png"]

        report = client.post(f"/api/datasets/{ds['id']}/check", json={"resolution": 32}, headers=AUTH).json()
        assert report["ok"] is True and report["num_samples"] == 2
        report = client.post(f"/api/datasets/{ds['id']}/check", json={"resolution": 512}, headers=AUTH).json()
        assert report["ok"] is False and any(f["level"] == "error" for f in report["findings"])  # 40 px < 512/4


def test_job_validation_errors_per_field(tmp_path, tiny_sd):
    with make_client(tmp_path / "home", run_jobs=False, model_roots=[tiny_sd.parent]) as client:
        res = client.post("/api/jobs", json={"config": {"base_model": str(tiny_sd), "train_data_dir": "datasets/x",
                                                        "lora_rank": "many", "learning_rat": 1, "resume": "latest"}},
                          headers=AUTH)
        assert res.status_code == 422
        by_key = {tuple(e["loc"][1:]): e["msg"] for e in res.json()["detail"]}
        assert set(by_key) == {("config", "lora_rank"), ("config", "learning_rat"), ("config", "resume")}
        assert "did you mean 'learning_rate'" in by_key[("config", "learning_rat")]
        res = client.post("/api/jobs", json={"config_yaml": "lora_rank: [1,\n"}, headers=AUTH)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "config_yaml"]
        res = client.post("/api/jobs", json={"dataset_id": "nope", "config": {"base_model": "m"}}, headers=AUTH)
        assert res.status_code == 422 and res.json()["detail"][0]["loc"] == ["body", "dataset_id"]
        res = client.post("/api/jobs/validate",
                          json={"config_yaml": f"base_model: {tiny_sd}\ntrain_data_dir: datasets/data\n"}, headers=AUTH)
        assert res.status_code == 200
        # relative to the home
        assert res.json()["config"]["train_data_dir"] == str((tmp_path / "home" / "datasets" / "data").resolve())
        assert client.get("/api/jobs", headers=AUTH).json() == []  # nothing was queued


def test_queue_cancel_resume_and_metrics(tmp_path, tiny_sd):
    home = tmp_path / "home"
    with make_client(home, run_jobs=False, model_roots=[tiny_sd.parent]) as client:
        body = {"config": {"base_model": str(tiny_sd), "train_data_dir": "datasets/data"}}
        ids = [client.post("/api/jobs", json={**body, "name": f"j{i}"}, headers=AUTH).json()["id"] for i in range(3)]
        assert [j["state"] for j in client.get("/api/jobs", headers=AUTH).json()] == ["queued"] * 3
        assert client.post(f"/api/jobs/{ids[0]}/cancel", headers=AUTH).json()["state"] == "cancelled"
        assert client.post(f"/api/jobs/{ids[1]}/resume", headers=AUTH).status_code == 409  # queued: nothing to resume
        metrics = client.get("/metrics", headers=AUTH).text
        assert 'lora_jobs{state="queued"} 2.0' in metrics and 'lora_jobs{state="cancelled"} 1.0' in metrics
        assert "lora_queue_length 2.0" in metrics
        assert client.post(f"/api/jobs/{ids[0]}/resume", headers=AUTH).json()["state"] == "queued"
        assert client.get("/api/jobs?state=queued", headers=AUTH).json().__len__() == 3
        assert client.get("/api/jobs/nope", headers=AUTH).status_code == 404

    # a runner on the same home now runs them (the fake trainer just records the job id), oldest first
    with make_client(home, train_command=RECORD_COMMAND, model_roots=[tiny_sd.parent]) as client:
        for job_id in ids:
            assert wait_job(client, job_id)["state"] == "succeeded"
        assert (home / "ran.txt").read_text().split() == ids
        assert "lora_queue_length 0.0" in client.get("/metrics", headers=AUTH).text


def test_cancel_running_job_sends_sigterm(tmp_path, tiny_sd):
    home = tmp_path / "home"
    # a fake trainer that, like the real one, exits 0 on SIGTERM after saying so
    command = [__import__("sys").executable, "-c",
               "import signal,sys,time\n"
               "signal.signal(signal.SIGTERM, lambda *a: (print('stopped by SIGTERM', flush=True), sys.exit(0)))\n"
               "print('training', flush=True)\n"
               "while True: time.sleep(0.1)"]
    with make_client(home, train_command=command, model_roots=[tiny_sd.parent]) as client:
        job = client.post("/api/jobs", json={"config": {"base_model": str(tiny_sd), "train_data_dir": "datasets/d"}},
                          headers=AUTH).json()
        wait_for(lambda: "training" in client.get(f"/api/jobs/{job['id']}/log", headers=AUTH).json()["text"], "the fake trainer")
        assert client.post(f"/api/jobs/{job['id']}/cancel", headers=AUTH).json()["cancel_requested"] is True
        done = wait_job(client, job["id"])
        assert done["state"] == "cancelled"
        log = client.get(f"/api/jobs/{job['id']}/log", params={"follow": "true"}, headers=AUTH).text
        assert "stopped by SIGTERM" in log and "cancel requested" in log


def test_real_job_cancel_resume_and_download(tmp_path, tiny_sd, image_data, monkeypatch):
    """The whole path a user takes, through the API: upload, submit, cancel (the trainer checkpoints), resume,
    watch it finish, download a LoRA that loads."""
    # each checkpoint takes a second longer, so the cancel surely arrives before the last step on a fast machine
    monkeypatch.setenv("LORA_SCRIPTS_TEST_CHECKPOINT_DELAY", "1")
    home = tmp_path / "home"
    with make_client(home, model_roots=[tiny_sd.parent]) as client:
        ds = client.post("/api/datasets", json={"name": "shapes"}, headers=AUTH).json()
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(image_data.glob("*.png"))]
        assert client.post(f"/api/datasets/{ds['id']}/files", files=files, headers=AUTH).status_code == 200
        captions = {p.name: f"a shape number {i}" for i, p in enumerate(sorted(image_data.glob("*.png")))}
        assert client.put(f"/api/datasets/{ds['id']}/captions", json={"captions": captions}, headers=AUTH).status_code == 200
        res = client.post("/api/jobs", headers=AUTH, json={
            "name": "tiny lora", "dataset_id": ds["id"],
            "config_yaml": "logging:\n  tensorboard: false\nsample_prompts:\n  - {prompt: a red circle, steps: 2}\n",
            "config": {"base_model": str(tiny_sd), "resolution": 32, "lora_rank": 4, "batch_size": 2,
                       "max_train_steps": 8, "save_steps": 2}})
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        out = home / "jobs" / job_id / "output"
        wait_for(lambda: (out / "checkpoints" / "step-2").is_dir(), "the first checkpoint")
        assert client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH).status_code == 200
        job = wait_job(client, job_id)
        log = client.get(f"/api/jobs/{job_id}/log", headers=AUTH).json()["text"]
        assert job["state"] == "cancelled", log[-3000:]
        stopped = [line for line in log.splitlines() if line.startswith("stopped by SIGTERM after step")]
        assert stopped and job["step"] < 8, log[-3000:]
        assert (out / "checkpoints" / f"step-{job['step']}").is_dir()  # the trainer checkpointed on SIGTERM

        assert client.post(f"/api/jobs/{job_id}/resume", headers=AUTH).json()["state"] == "queued"
        job = wait_job(client, job_id)
        log = client.get(f"/api/jobs/{job_id}/log", headers=AUTH).json()["text"]
        assert job["state"] == "succeeded", log[-3000:]
        assert f"resumed from {out / 'checkpoints' / ('step-%d' % int(stopped[0].split()[5].rstrip(';')))}" in log
        assert job["attempts"] == 2 and job["step"] == 8 and job["loss"] is not None and job["total_steps"] == 8
        paths = {a["path"] for a in job["artifacts"]}
        assert {"tiny_lora.safetensors", "diffusers/pytorch_lora_weights.safetensors", "logs/loss.csv",
                "training_summary.json"} <= paths  # the LoRA is named after the job
        assert job["samples"] and all(s["path"].startswith("samples/") for s in job["samples"])
        res = client.get(f"/api/jobs/{job_id}/artifacts/tiny_lora.safetensors", headers=AUTH)
        assert res.status_code == 200
        downloaded = tmp_path / "downloaded.safetensors"
        downloaded.write_bytes(res.content)
        assert_same_tensors(downloaded, out / "tiny_lora.safetensors")
        assert [row["step"] for row in client.get(f"/api/jobs/{job_id}/loss", headers=AUTH).json()] == list(range(1, 9))
        assert client.get(f"/api/jobs/{job_id}/artifacts/../config.yaml", headers=AUTH).status_code == 404

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(downloaded))  # the downloaded file is a LoRA diffusers can load
