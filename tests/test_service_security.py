"""The service refuses what it must: writes without the token, reads without it off loopback, uploads that are too
big, of the wrong type, or that would land outside their dataset folder, and job outputs outside the home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .service_helpers import AUTH, zip_bytes
from .test_service_api import make_client, png_bytes

pytest.importorskip("fastapi")


@pytest.fixture()
def service(tmp_path):
    with make_client(tmp_path / "home", run_jobs=False) as client:
        client.home = tmp_path / "home"
        client.dataset = client.post("/api/datasets", json={"name": "d"}, headers=AUTH).json()["id"]
        yield client


def upload(client, *files, headers=AUTH):
    return client.post(f"/api/datasets/{client.dataset}/files", files=[("files", f) for f in files], headers=headers)


def dataset_files(client) -> list[str]:
    return sorted(p.name for p in (client.home / "datasets" / client.dataset).iterdir())


def outside_files(client) -> list[str]:
    """Files anywhere under the home's parent that are not where they belong (an escaped upload would show)."""
    root = client.home.parent
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "evil" in p.name)


@pytest.mark.parametrize("method,path,body", [
    ("post", "/api/datasets", {"name": "x"}),
    ("post", "/api/jobs", {"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}),
    ("post", "/api/jobs/validate", {"config": {}}),
    ("post", "/api/jobs/abc/cancel", None),
    ("post", "/api/jobs/abc/resume", None),
    ("put", "/api/datasets/abc/captions", {"captions": {}}),
    ("post", "/api/datasets/abc/label", {"backend": "filename"}),
    ("post", "/api/datasets/abc/check", {}),
])
def test_every_write_needs_the_token(service, method, path, body):
    res = getattr(service, method)(path, **({"json": body} if body is not None else {}))
    assert res.status_code == 401
    res = getattr(service, method)(path, headers={"Authorization": "Bearer wrong"},
                                   **({"json": body} if body is not None else {}))
    assert res.status_code == 403
    # the console's cookie counts only together with its X-Console header (a cross-site form cannot add it)
    service.cookies.set("lora_token", "test-token")
    try:
        res = getattr(service, method)(path, **({"json": body} if body is not None else {}))
        assert res.status_code == 401
    finally:
        service.cookies.clear()


def test_upload_needs_the_token(service):
    assert upload(service, ("a.png", png_bytes(), "image/png"), headers={}).status_code == 401
    assert dataset_files(service) == []


def test_generated_token_is_saved_private_and_reused(tmp_path):
    from lora_scripts.service.security import load_or_create_token

    token, created = load_or_create_token(tmp_path, None)
    assert created and len(token) >= 24
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path, None) == (token, False)
    assert load_or_create_token(tmp_path, "given") == ("given", False)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_reads_need_the_token_on_every_address(tmp_path, host):
    with make_client(tmp_path / "home", run_jobs=False, host=host) as client:
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/").status_code == 401  # the console shows its sign-in page
        assert client.get("/api/jobs", headers=AUTH).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes stay open


@pytest.mark.parametrize("name", ["../evil.png", "..\\evil.png", "/tmp/evil.png", ".evil.png", "sub/evil.png", ".."])
def test_upload_names_cannot_escape(service, name):
    res = upload(service, (name, png_bytes(), "image/png"))
    assert res.status_code in (400, 422), res.text
    assert dataset_files(service) == [] and outside_files(service) == []


def test_zip_slip_is_refused(service):
    data = zip_bytes({"good.png": png_bytes(), "../../evil.png": png_bytes()})
    res = upload(service, ("set.zip", data, "application/zip"))
    assert res.status_code == 422 and "path traversal" in res.json()["detail"][0]["msg"]
    assert dataset_files(service) == [] and outside_files(service) == []  # nothing at all was extracted
    res = upload(service, ("set.zip", zip_bytes({"/abs/evil.png": png_bytes()}), "application/zip"))
    assert res.status_code == 422 and outside_files(service) == []


def test_symlink_in_zip_is_refused(service):
    data = zip_bytes({"good.png": png_bytes()}, symlinks={"evil.png": "/etc/passwd"})
    res = upload(service, ("set.zip", data, "application/zip"))
    assert res.status_code == 422 and "symlink" in res.json()["detail"][0]["msg"]
    assert dataset_files(service) == []


def test_symlink_in_the_dataset_is_not_followed(service, tmp_path):
    target = tmp_path / "evil_target.png"
    target.write_bytes(b"keep me")
    os.symlink(target, service.home / "datasets" / service.dataset / "a.png")
    assert upload(service, ("a.png", png_bytes(), "image/png")).status_code == 400
    assert target.read_bytes() == b"keep me"
    assert service.get(f"/api/datasets/{service.dataset}/files/a.png", headers=AUTH).status_code == 404  # not served


def test_a_good_zip_is_extracted(service):
    data = zip_bytes({"a.png": png_bytes(), "a.txt": b"a red square", "b.png": png_bytes((0, 200, 0))})
    res = upload(service, ("set.zip", data, "application/zip"))
    assert res.status_code == 200, res.text
    assert dataset_files(service) == ["a.png", "a.txt", "b.png"]


def test_oversize_is_refused(tmp_path):
    from lora_scripts.service.security import UploadLimits

    with make_client(tmp_path / "home", run_jobs=False, limits=UploadLimits(max_file_bytes=2000,
                                                                           max_total_bytes=5000)) as client:
        ds = client.post("/api/datasets", json={"name": "d"}, headers=AUTH).json()["id"]
        big = png_bytes(size=(400, 400)) + b"\0" * 3000
        res = client.post(f"/api/datasets/{ds}/files", files=[("files", ("big.png", big, "image/png"))], headers=AUTH)
        assert res.status_code == 413
        # a zip whose entry unpacks past the limit (it compresses well, so the zip itself is small)
        bomb = zip_bytes({"big.png": b"\0" * 100_000})
        res = client.post(f"/api/datasets/{ds}/files", files=[("files", ("b.zip", bomb, "application/zip"))],
                          headers=AUTH)
        assert res.status_code == 413
        assert list((tmp_path / "home" / "datasets" / ds).iterdir()) == []


@pytest.mark.parametrize("name,data", [
    ("script.sh", b"#!/bin/sh\nrm -rf /\n"),
    ("fake.png", b"<html>not an image</html>"),
    ("photo.jpg", None),  # a PNG named .jpg
    ("noext", b"abc"),
    ("caption.txt", b"\xff\xfe\xfa bad utf-8"),
])
def test_wrong_type_is_refused(service, name, data):
    res = upload(service, (name, png_bytes() if data is None else data, "application/octet-stream"))
    assert res.status_code in (415, 422), res.text
    assert dataset_files(service) == []


@pytest.mark.parametrize("key,value", [
    ("output_dir", "/tmp/elsewhere"),
    ("output_dir", "../../../escape"),
    ("output_dir", ".."),
    ("cache_dir", "/var/tmp/cache"),
    ("output_name", "../../../evil"),
    ("output_name", "/tmp/evil"),
])
def test_job_outputs_stay_inside_the_home(service, key, value):
    body = {"config": {"base_model": "models/m", "train_data_dir": "datasets/d", key: value}}
    res = service.post("/api/jobs", json=body, headers=AUTH)
    assert res.status_code == 422
    assert [e["loc"] for e in res.json()["detail"]] == [["body", "config", key]]
    assert service.get("/api/jobs", headers=AUTH).json() == []


def test_the_service_decides_output_dir(service):
    res = service.post("/api/jobs/validate", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}},
                       headers=AUTH)
    assert res.status_code == 200
    assert res.json()["config"]["output_dir"] == str((service.home / "jobs" / "validate" / "output").resolve())


def test_no_shell_is_ever_used():
    """Every subprocess the service starts gets a list of arguments; no shell=True, os.system or os.popen."""
    import lora_scripts.service as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "shell=True" not in text and "os.system" not in text and "os.popen" not in text, path


def test_label_trigger_is_a_value_not_an_option(service):
    """A trigger word that looks like an option reaches the labeller as text."""
    upload(service, ("a.png", png_bytes(), "image/png"))
    res = service.post(f"/api/datasets/{service.dataset}/label", json={"backend": "filename", "trigger": "--overwrite; rm -rf ~"},
                       headers=AUTH)
    assert res.status_code == 200, res.text
    assert res.json()["dataset"]["images"][0]["caption"] == "--overwrite; rm -rf ~, a"
