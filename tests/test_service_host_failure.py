"""Host failure, end to end: two servers ("hosts") share one database and one storage folder. The host running a
job dies at once (kill -9 of its server and of its trainer's whole process group: no checkpoint on the way out).
The other host notices the silence after one lease, takes the job over and finishes it from the last checkpoint,
ending with the same LoRA as an uninterrupted run of the same config."""

from __future__ import annotations

import os
import signal

import pytest

from .helpers import assert_same_tensors
from .service_helpers import AUTH, ServerProcess, start_reference_run, wait_for, wait_job

pytest.importorskip("fastapi")

STEPS = 8
LEASE = 3  # seconds without a heartbeat before a host is presumed lost (default 60)


def test_a_lost_hosts_job_resumes_on_the_other_host_to_the_same_lora(tmp_path, tiny_sd, image_data):
    from lora_scripts.service.runner import process_start_time
    from lora_scripts.testing import tiny_image_config

    shared = tmp_path / "shared"  # the NFS/RWX volume both hosts mount: database, datasets, jobs
    shared.mkdir()
    keys = dict(max_train_steps=STEPS, save_steps=2, output_name="lora", batch_size=2)
    reference = start_reference_run(tiny_image_config(tiny_sd, image_data, tmp_path / "reference", **keys),
                                    tmp_path / "reference.yaml")

    hosts = [ServerProcess(shared, extra=["--lease", str(LEASE), "--model-root", str(tiny_sd.parent),
                                             "--model-root", str(image_data)]) for _ in range(2)]
    try:
        job_cfg = tiny_image_config(tiny_sd, image_data, "unused", **keys)
        job_cfg.pop("output_dir")
        res = hosts[0].client.post("/api/jobs", headers=AUTH, json={"name": "host loss", "config": job_cfg})
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        checkpoints = shared / "jobs" / job_id / "output" / "checkpoints"
        wait_for(lambda: (checkpoints / "step-2").is_dir(), "the job's first checkpoint", timeout=300)
        job = hosts[0].client.get(f"/api/jobs/{job_id}", headers=AUTH).json()
        assert job["state"] == "running" and job["pid"]
        lost = next(h for h in hosts if job["worker"].endswith(f":{h.port}"))
        survivor = next(h for h in hosts if h is not lost)

        # the host dies: its trainer's process group and its server, both with SIGKILL
        assert process_start_time(job["pid"]) == job["proc_start"]
        os.killpg(job["pid"], signal.SIGKILL)
        lost.proc.kill()
        lost.proc.wait()
        lost.stop()

        job = wait_job(survivor.client, job_id, timeout=400)
        log = survivor.client.get(f"/api/jobs/{job_id}/log").json()["text"]
        assert job["state"] == "succeeded", log[-3000:]
        assert job["worker"].endswith(f":{survivor.port}") and job["attempts"] == 2 and job["step"] == STEPS
        assert "presumed lost" in log
        assert "stopped by SIGTERM" not in log  # the lost host wrote nothing on its way out
        resumed = [line for line in log.splitlines() if line.startswith("resumed from")]
        assert resumed and f"step-{STEPS}" not in resumed[-1], log[-3000:]  # it resumed mid-run
    finally:
        for host in hosts:
            host.stop()

    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-2000:]
    output = shared / "jobs" / job_id / "output"
    assert_same_tensors(output / "lora.safetensors", tmp_path / "reference" / "lora.safetensors")
    assert_same_tensors(output / "diffusers" / "pytorch_lora_weights.safetensors",
                        tmp_path / "reference" / "diffusers" / "pytorch_lora_weights.safetensors")
