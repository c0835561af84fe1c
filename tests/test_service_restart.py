"""kill -9 the server mid-job, start it again: the job resumes from its checkpoint and ends with the same LoRA as
an uninterrupted run of the same config."""

from __future__ import annotations

import pytest

from .helpers import assert_same_tensors
from .service_helpers import AUTH, ServerProcess, start_reference_run, wait_for, wait_job

pytest.importorskip("fastapi")

STEPS = 8


def test_kill_9_server_mid_job_resumes_to_the_same_lora(tmp_path, tiny_sd, image_data):
    from lora_scripts.testing import tiny_image_config

    home = tmp_path / "home"
    home.mkdir()
    keys = dict(max_train_steps=STEPS, save_steps=2, output_name="lora", batch_size=2)
    # the uninterrupted reference run, alongside the service's run
    roots = ["--model-root", str(tiny_sd.parent), "--model-root", str(image_data)]  # jobs may read them
    reference = start_reference_run(tiny_image_config(tiny_sd, image_data, tmp_path / "reference", **keys),
                                    tmp_path / "reference.yaml")

    server = ServerProcess(home, extra=roots)
    try:
        job_cfg = tiny_image_config(tiny_sd, image_data, "unused", **keys)
        job_cfg.pop("output_dir")
        res = server.client.post("/api/jobs", headers=AUTH, json={"name": "restart", "config": job_cfg})
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        checkpoints = home / "jobs" / job_id / "output" / "checkpoints"
        wait_for(lambda: (checkpoints / "step-2").is_dir(), "the job's first checkpoint", timeout=300)
        first = server.client.get(f"/api/jobs/{job_id}", headers=AUTH).json()
        assert first["state"] == "running" and first["pid"]
        server.proc.kill()  # kill -9: no clean-up of any kind
        server.proc.wait()
        server.stop()

        server = ServerProcess(home, port=server.port, extra=roots)  # same host:port, so the same worker identity
        job = wait_job(server.client, job_id, timeout=400)
        log = server.client.get(f"/api/jobs/{job_id}/log").json()["text"]
        assert job["state"] == "succeeded", log[-3000:]
        assert job["attempts"] == 2 and job["step"] == STEPS
        assert "requeued to resume" in log
        assert "stopped by SIGTERM" in log  # the dying server's trainer checkpointed and stopped (PDEATHSIG)
        resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
        assert resumed and f"step-{STEPS}" not in resumed[-1], log[-3000:]  # it resumed mid-run, not at the end
    finally:
        server.stop()

    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-2000:]
    assert_same_tensors(home / "jobs" / job_id / "output" / "lora.safetensors", tmp_path / "reference" / "lora.safetensors")
    assert_same_tensors(home / "jobs" / job_id / "output" / "diffusers" / "pytorch_lora_weights.safetensors",
                        tmp_path / "reference" / "diffusers" / "pytorch_lora_weights.safetensors")
