"""``lora-scripts serve`` from the command line: --demo, the printed token, one-line errors."""

from __future__ import annotations

import pytest

from .helpers import run_cli
from .service_helpers import AUTH, TOKEN, ServerProcess

pytest.importorskip("fastapi")


def test_serve_demo_prepares_model_dataset_and_form(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    server = ServerProcess(home, extra=["--demo"])
    try:
        datasets = server.client.get("/api/datasets").json()
        assert [(d["name"], d["count"], d["captioned"]) for d in datasets] == [("shapes (demo)", 12, 12)]
        form = server.client.get("/jobs/new").text
        assert 'value="models/tiny-sd"' in form and "shapes (demo)" in form
        # the pre-filled form, as the console's JS sends it, is a valid job
        body = {"name": "demo shapes LoRA", "dataset_id": datasets[0]["id"], "config_yaml": "logging:\n  tensorboard: false\n",
                "config": {"base_model": "models/tiny-sd", "resolution": 32, "max_train_steps": 60, "save_steps": 10,
                           "learning_rate": 2e-3, "sample_prompts": ["a red circle in the style of lora"]}}
        res = server.client.post("/api/jobs/validate", json=body, headers=AUTH)
        assert res.status_code == 200, res.text
        assert res.json()["config"]["base_model"] == str(home.resolve() / "models" / "tiny-sd")
        assert res.json()["config"]["output_name"] == "demo_shapes_LoRA"  # the LoRA file is named after the job
    finally:
        server.stop()
    log = (tmp_path / f"server-{server.port}.log").read_text()
    assert "console: http://localhost:" in log and "/docs" in log
    assert TOKEN not in log  # never in a log or a URL (it used to be printed in the console's sign-in link)


def test_serve_prints_a_new_token_once(tmp_path):
    from lora_scripts.service.app import Service, ServiceSettings

    svc = Service(ServiceSettings(home=tmp_path / "home", run_jobs=False))
    assert svc.token_created and (tmp_path / "home" / "token").read_text().strip() == svc.token
    again = Service(ServiceSettings(home=tmp_path / "home", run_jobs=False))
    assert not again.token_created and again.token == svc.token


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port: 70000 is not a port number"),
    (["--slots", "0"], "--slots: must be at least 1"),
    (["--lease", "0"], "--lease: 0 must be a positive number of seconds"),
    (["--db", "mysql://x/y"], "--db: 'mysql://x/y' is not a sqlite:/// or postgresql:// URL"),
    (["--db", "postgresql://nobody@127.0.0.1:1/x"], "--db: cannot use the database"),
    (["--mirror", "/not/s3"], "--mirror: '/not/s3' is not an s3://bucket/prefix URL"),
    (["--model-root", "/no/such/folder"], "--model-root: /no/such/folder is not a folder"),
])
def test_serve_user_errors_are_one_line(tmp_path, args, message):
    res = run_cli("serve", "--home", str(tmp_path / "home"), *args, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: " + message) and res.stderr.count("\n") == 1


def test_the_token_is_printed_only_on_a_terminal(tmp_path):
    from lora_scripts.service.serve import token_line

    path = tmp_path / "token"
    assert "s3cret" in token_line("s3cret", path, created=True, given=False, terminal=True)
    piped = token_line("s3cret", path, created=True, given=False, terminal=False)
    assert "s3cret" not in piped and str(path) in piped
    assert "s3cret" not in token_line("s3cret", path, created=False, given=True, terminal=True)


def test_unwritable_home_is_one_line(tmp_path):
    """A /data volume the container user cannot write: one line naming the folder and the UID, no traceback."""
    (tmp_path / "file").write_text("x")
    res = run_cli("serve", "--home", str(tmp_path / "file" / "home"), timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert str(tmp_path / "file" / "home") in res.stderr and f"UID {__import__('os').getuid()}" in res.stderr


def test_core_does_not_import_the_service():
    """`lora-scripts --help` and the trainer never load FastAPI, SQLAlchemy or the service package."""
    import subprocess
    import sys

    from .helpers import cli_env

    code = ("import sys, lora_scripts.cli as c, lora_scripts.config; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'sqlalchemy', 'uvicorn') "
            "or m.startswith('lora_scripts.service')))")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_allow_remote_code_comes_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    from lora_scripts.cli import build_parser
    from lora_scripts.errors import ConfigError
    from lora_scripts.service.serve import settings_from_args

    def allowed(*extra: str) -> bool:
        return settings_from_args(build_parser().parse_args(["serve", "--home", str(tmp_path), *extra])).allow_remote_code

    monkeypatch.delenv("LORA_SCRIPTS_ALLOW_REMOTE_CODE", raising=False)
    assert not allowed() and allowed("--allow-remote-code")
    monkeypatch.setenv("LORA_SCRIPTS_ALLOW_REMOTE_CODE", "1")  # the Kubernetes ConfigMap's way
    assert allowed()
    monkeypatch.setenv("LORA_SCRIPTS_ALLOW_REMOTE_CODE", "0")
    assert not allowed()
    monkeypatch.setenv("LORA_SCRIPTS_ALLOW_REMOTE_CODE", "maybe")
    with pytest.raises(ConfigError, match="LORA_SCRIPTS_ALLOW_REMOTE_CODE: 'maybe' is not"):
        allowed()
