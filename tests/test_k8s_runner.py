"""The kubernetes runner against a fake API server (tests/fake_kube.py): the official client's real HTTP requests,
the Job it posts, following Complete/Failed, cancel, re-attaching after a restart, copying the pod log; and
``serve --runner kubernetes`` from the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .fake_kube import FakeKube
from .helpers import cli_env
from .service_helpers import AUTH, wait_for

pytest.importorskip("sqlalchemy")
pytest.importorskip("kubernetes")

NS = "lora-scripts"
IMAGE = "registry.example/lora-scripts:1.2.3"


@pytest.fixture
def kube(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    fake = FakeKube(NS)
    yield fake
    fake.close()


@pytest.fixture
def store(tmp_path):
    from lora_scripts.service.store import JobStore

    s = JobStore(f"sqlite:///{tmp_path / 'service.db'}")
    s.migrate()
    yield s
    s.dispose()


def make_runner(tmp_path, kube, store, worker="k8s", **kwargs):
    from lora_scripts.service.k8s_runner import KubernetesRunner

    home = tmp_path / "data" / "home"
    (home / "jobs").mkdir(parents=True, exist_ok=True)
    finished = []
    runner = KubernetesRunner(store, home, worker, namespace=NS, image=IMAGE, data_path=str(tmp_path / "data"),
                              kubeconfig=str(kube.kubeconfig(tmp_path / "kubeconfig")),
                              on_finish=finished.append, **kwargs)
    runner.finished = finished
    runner.log_sync_seconds = 0  # copy the pod log on every round
    return runner


def propagation(request) -> str | None:
    """The propagationPolicy of a recorded DELETE (a query parameter, or DeleteOptions in the body)."""
    return (request["body"] or {}).get("propagationPolicy") or request["query"].get("propagationPolicy", [None])[0]


def queue(store, runner, job_id):
    store.create_job(job_id, job_id, "max_train_steps: 10\n")
    (runner.home / "jobs" / job_id).mkdir(parents=True, exist_ok=True)


def test_job_names_are_rfc1123_and_distinct():
    from lora_scripts.service.k8s_runner import job_label, job_name

    ids = ["0123456789ab", "ABC", "abc", "a_b", "x" * 80, "x" * 81, "-a-"]
    names = [job_name(i) for i in ids]
    assert names[0] == "lora-train-0123456789ab"
    assert len(set(names)) == len(ids)
    for name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name), name
    assert job_label("0123456789ab") == "0123456789ab" and len(job_label("x" * 80)) <= 63


def test_submits_the_job_follows_it_to_success_and_copies_the_log(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "job1")
    runner.tick()
    posts = kube.calls("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")
    assert len(posts) == 1
    job = posts[0]["body"]
    assert job["metadata"]["name"] == "lora-train-job1" and job["metadata"]["namespace"] == NS
    assert job["metadata"]["labels"]["lora-scripts.io/job-id"] == "job1"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["lora-scripts.io/job-id"] == "job1"
    (container,) = pod["spec"]["containers"]
    config = runner.home / "jobs" / "job1" / "config.yaml"
    assert container["name"] == "trainer" and container["image"] == IMAGE
    assert container["args"] == ["train", "--config", str(config), "--resume", "latest", "--no-progress"]
    assert container["workingDir"] == str(config.parent)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "LORA_SCRIPTS_JOB_ID", "value": "job1"} in container["env"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "data", "mountPath": str(tmp_path / "data")} in container["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "lora-scripts-data"
    assert "emptyDir" in volumes["tmp"]
    assert pod["spec"]["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}} in rules
    assert any(r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules)
    assert store.get_job("job1")["state"] == "running" and runner.started_jobs == 1

    # a pending pod says why; the running pod's log is copied while it runs
    kube.pending_pod("lora-train-job1", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    runner.tick()
    pod_name = kube.start_pod("lora-train-job1", b"loading model\nstep 1 loss 0.9\n")
    runner.tick()
    log = (runner.home / "jobs" / "job1" / "train.log").read_text()
    assert "Insufficient nvidia.com/gpu" in log and "step 1 loss 0.9\n" in log
    assert log.startswith("[service] attempt 1 on k8s: Kubernetes Job lora-scripts/lora-train-job1: lora-scripts train")
    kube.log(pod_name, b"step 2 loss 0.5\nfinished: 2 steps\n")
    kube.finish("lora-train-job1", pod_name, 0)
    runner.tick()
    done = store.get_job("job1")
    assert (done["state"], done["exit_code"], done["error"]) == ("succeeded", 0, None)
    log = (runner.home / "jobs" / "job1" / "train.log").read_text()
    assert log.count("step 1 loss 0.9") == 1 and log.endswith("finished: 2 steps\n")  # appended, never repeated
    deletes = kube.calls("DELETE", "/jobs/lora-train-job1")
    assert len(deletes) == 1 and propagation(deletes[0]) == "Background"
    assert [j["id"] for j in runner.finished] == ["job1"] and runner.running == {}


def test_bad_input_exit_2_fails_the_job_with_the_trainers_error(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "bad")
    runner.tick()
    pod = kube.start_pod("lora-train-bad", b"error: train_data_dir: /data/home/x does not exist\n")
    kube.finish("lora-train-bad", pod, 2, message="error: train_data_dir: /data/home/x does not exist\n",
                reason="PodFailurePolicy")
    runner.tick()
    job = store.get_job("bad")
    assert (job["state"], job["exit_code"]) == ("failed", 2)
    assert job["error"] == "train_data_dir: /data/home/x does not exist"
    assert [j["state"] for j in runner.finished] == ["failed"]  # the after-job hook sees every end, as locally


def test_failure_without_an_error_line_names_the_exit_code_and_reason(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "oom")
    runner.tick()
    pod = kube.start_pod("lora-train-oom", b"step 1\n")
    kube.finish("lora-train-oom", pod, 137, reason="BackoffLimitExceeded")
    runner.tick()
    job = store.get_job("oom")
    assert (job["state"], job["exit_code"]) == ("failed", 137)
    assert "exited with code 137" in job["error"] and "BackoffLimitExceeded" in job["error"]


def test_cancel_deletes_the_job_in_the_foreground_then_marks_it_cancelled(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "c1")
    runner.tick()
    kube.start_pod("lora-train-c1", b"step 1\n")
    store.request_cancel("c1")
    runner.tick()
    deletes = kube.calls("DELETE", "/jobs/lora-train-c1")
    assert len(deletes) == 1 and propagation(deletes[0]) == "Foreground"
    # the Job is still there while its pod stops: not cancelled yet, and no second delete
    runner.tick()
    assert store.get_job("c1")["state"] == "running"
    runner.tick()  # now it is gone
    job = store.get_job("c1")
    assert (job["state"], job["exit_code"]) == ("cancelled", None)
    assert len(kube.calls("DELETE", "/jobs/lora-train-c1")) == 1
    log = (runner.home / "jobs" / "c1" / "train.log").read_text()
    assert "step 1" in log and "cancel requested: deleting Kubernetes Job lora-train-c1" in log
    # resume: a fresh Job under the same name, attempt 2
    assert store.resume("c1")
    runner.tick()
    assert len(kube.calls("POST", "/jobs")) == 2 and store.get_job("c1")["attempts"] == 2


def test_restart_reattaches_to_live_jobs_and_requeues_vanished_ones(tmp_path, kube, store):
    first = make_runner(tmp_path, kube, store, slots=2)
    queue(store, first, "live")
    queue(store, first, "lost")
    first.tick()
    assert len(kube.calls("POST", "/jobs")) == 2
    pod = kube.start_pod("lora-train-live", b"step 1\n")
    first.tick()
    first.stop()  # the server goes away; the Jobs stay in the cluster
    kube.remove_job("lora-train-lost")  # e.g. deleted by hand while the server was down
    kube.log(pod, b"step 2\n")

    second = make_runner(tmp_path, kube, store, slots=2)
    second.tick()
    assert second.reattached == ["live"]
    posts = kube.calls("POST", "/jobs")
    # nothing was submitted for the live one; the lost one was requeued and submitted again (attempt 2)
    assert [p["body"]["metadata"]["name"] for p in posts] == ["lora-train-live", "lora-train-lost", "lora-train-lost"]
    assert store.get_job("lost")["attempts"] == 2
    assert "is gone; requeued" in (second.home / "jobs" / "lost" / "train.log").read_text()
    kube.finish("lora-train-live", pod, 0)
    second.tick()
    assert store.get_job("live")["state"] == "succeeded"
    log = (second.home / "jobs" / "live" / "train.log").read_text()
    assert log.count("step 1\n") == 1 and log.count("step 2\n") == 1  # the copy resumed where it stopped


def test_unreachable_api_server_leaves_the_job_queued(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "j")
    runner._recovered = True
    kube.fail_next = 503
    with pytest.raises(Exception):
        runner.tick()
    assert store.get_job("j")["state"] == "queued"
    runner.tick()
    assert store.get_job("j")["state"] == "running"


def test_invalid_request_fails_the_job_with_the_api_message(tmp_path, kube, store):
    runner = make_runner(tmp_path, kube, store)
    queue(store, runner, "j")
    runner._recovered = True
    kube.fail_next = 403
    runner.tick()
    job = store.get_job("j")
    assert job["state"] == "failed" and job["error"].startswith("could not create the Kubernetes Job lora-train-j: 403")


def test_service_with_the_kubernetes_runner_end_to_end(tmp_path, kube):
    """The app builds the kubernetes runner from its settings; a job posted to the API runs as a Job."""
    from fastapi.testclient import TestClient

    from lora_scripts.service.app import ServiceSettings, create_app
    from lora_scripts.service.k8s_runner import KubernetesRunner

    home = tmp_path / "data" / "home"
    settings = ServiceSettings(home=home, token="test-token", poll_seconds=0.05, runner="kubernetes", worker="k8s",
                               k8s_options={"namespace": NS, "image": IMAGE, "data_path": str(tmp_path / "data"),
                                            "kubeconfig": str(kube.kubeconfig(tmp_path / "kubeconfig"))})
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        assert isinstance(client.app.state.service.runner, KubernetesRunner)
        assert client.get("/readyz").json()["ready"] is True
        job = client.post("/api/jobs", json={"config": {"base_model": "models/m", "train_data_dir": "datasets/d"}}, headers=AUTH)
        assert job.status_code == 201, job.text
        name = f"lora-train-{job.json()['id']}"
        wait_for(lambda: name in kube.jobs, "the Job to be created", timeout=30)
        args = kube.jobs[name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[2] == str(home.resolve() / "jobs" / job.json()["id"] / "config.yaml")
        pod = kube.start_pod(name, b"done\n")
        kube.finish(name, pod, 0)
        wait_for(lambda: client.get(f"/api/jobs/{job.json()['id']}", headers=AUTH).json()["state"] == "succeeded",
                 "the job to succeed", timeout=30)


def _serve(tmp_path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = cli_env()
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "LORA_SCRIPTS_K8S_KUBECONFIG", "POD_NAME"):
        full.pop(var, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "lora_scripts.cli", "serve", "--home", str(tmp_path / "data" / "home"),
                           "--port", "1", *args], env=full, capture_output=True, text=True, timeout=120)


def test_serve_runner_kubernetes_without_a_cluster_is_a_one_line_error(tmp_path):
    env = {"LORA_SCRIPTS_K8S_DATA_PATH": str(tmp_path / "data")}
    res = _serve(tmp_path, "--runner", "kubernetes", "--k8s-image", IMAGE, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: --runner kubernetes: no Kubernetes configuration: not inside a cluster")
    assert res.stderr.count("\n") == 1
    res = _serve(tmp_path, "--runner", "kubernetes", "--k8s-image", IMAGE, "--k8s-kubeconfig", str(tmp_path / "nope"),
                 env=env)
    assert res.returncode == 2 and res.stderr == f"error: --k8s-kubeconfig: {tmp_path / 'nope'} does not exist\n"
    res = _serve(tmp_path, "--runner", "kubernetes", "--k8s-image", IMAGE)  # the home is not under /data
    assert res.returncode == 2 and "is not on the shared volume the training Jobs mount at /data" in res.stderr
    res = _serve(tmp_path, "--runner", "kubernetes", env=env)
    assert res.returncode == 2 and res.stderr.startswith("error: --runner kubernetes: no trainer image")
    res = _serve(tmp_path, "--runner", "nomad")
    assert res.returncode == 2 and "invalid choice: 'nomad'" in res.stderr


def test_serve_options_reach_the_runner(tmp_path, kube):
    from lora_scripts.cli import build_parser
    from lora_scripts.service.app import Service
    from lora_scripts.service.k8s_runner import KubernetesRunner
    from lora_scripts.service.serve import settings_from_args

    args = build_parser().parse_args(
        ["serve", "--home", str(tmp_path / "data" / "home"), "--runner", "kubernetes", "--k8s-namespace", "team-a",
         "--k8s-image", IMAGE, "--k8s-kubeconfig", str(kube.kubeconfig(tmp_path / "kubeconfig"))])
    settings = settings_from_args(args)
    assert settings.runner == "kubernetes"
    settings.k8s_options["data_path"] = str(tmp_path / "data")
    runner = Service(settings).runner
    assert isinstance(runner, KubernetesRunner)
    assert (runner.namespace, runner.image) == ("team-a", IMAGE)
    os.environ.pop("LORA_SCRIPTS_RUNNER", None)
    assert settings_from_args(build_parser().parse_args(["serve", "--home", str(tmp_path / "h")])).runner == "local"


def test_the_role_grants_exactly_what_the_runner_calls(tmp_path, kube, store, monkeypatch):
    """deploy/k8s/base/rbac.yaml against the verbs the runner's recorded requests needed over a whole life: its own
    pod's image, submit, a pending and a running pod, the log, success, cancel (a Foreground delete), resume."""
    import yaml

    from lora_scripts.service.k8s_runner import SERVICE_CONTAINER

    from .conftest import REPO_ROOT

    monkeypatch.setenv("POD_NAME", "lora-scripts-0")
    kube.pods["lora-scripts-0"] = {"metadata": {"name": "lora-scripts-0", "namespace": NS, "labels": {}},
                                   "spec": {"containers": [{"name": SERVICE_CONTAINER, "image": IMAGE}]}}
    runner = make_runner(tmp_path, kube, store)
    runner.image = None  # as in the cluster without --k8s-image: read from the service's own pod
    queue(store, runner, "ok")
    runner.tick()
    kube.pending_pod("lora-train-ok", "0/1 nodes are available")
    runner.tick()
    pod = kube.start_pod("lora-train-ok", b"step 1\n")
    runner.tick()
    kube.finish("lora-train-ok", pod, 0)
    runner.tick()
    assert store.get_job("ok")["state"] == "succeeded"
    queue(store, runner, "c")
    runner.tick()
    kube.start_pod("lora-train-c", b"step 1\n")
    store.request_cancel("c")
    for _ in range(3):
        runner.tick()
    assert store.get_job("c")["state"] == "cancelled"

    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy" / "k8s" / "base" / "rbac.yaml").read_text()))
    role = next(d for d in docs if d["kind"] == "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == kube.rbac_rules()
