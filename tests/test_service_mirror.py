"""Finished jobs' outputs are mirrored to S3-compatible storage (moto's S3 server on loopback)."""

from __future__ import annotations

import sys

import pytest

from .service_helpers import AUTH, wait_for, wait_job
from .test_service_api import make_client

pytest.importorskip("fastapi")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

# a fake trainer that writes a LoRA-named file and a cache file into the job's output folder
WRITE_OUTPUT = [sys.executable, "-S", "-c",
                "import pathlib,sys; out=pathlib.Path(sys.argv[1])/'output'; (out/'cache').mkdir(parents=True); "
                "(out/'lora.safetensors').write_bytes(b'weights'); (out/'cache'/'x.pt').write_bytes(b'c')",
                "{job_dir}"]


@pytest.fixture()
def s3(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="loras")
    yield endpoint, client
    server.stop()


def test_finished_job_is_mirrored(tmp_path, s3):
    endpoint, client = s3
    with make_client(tmp_path / "home", train_command=WRITE_OUTPUT, mirror_url="s3://loras/team",
                     mirror_options={"endpoint_url": endpoint, "skip_instance_cache": True}) as api:
        job = api.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}, headers=AUTH).json()
        assert wait_job(api, job["id"])["state"] == "succeeded"

        def listed():
            found = client.list_objects_v2(Bucket="loras", Prefix=f"team/{job['id']}/").get("Contents", [])
            return [o["Key"] for o in found]

        keys = wait_for(listed, "the mirrored files", timeout=60)
        assert keys == [f"team/{job['id']}/lora.safetensors"]  # the cache is not mirrored
        body = client.get_object(Bucket="loras", Key=keys[0])["Body"].read()
        assert body == b"weights"


def test_mirror_url_must_be_s3(tmp_path):
    from lora_scripts.errors import ConfigError
    from lora_scripts.service.mirror import Mirror

    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        Mirror("/local/folder")
