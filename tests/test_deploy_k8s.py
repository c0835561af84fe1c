"""deploy/k8s: the kustomizations (rendered here for the subset of kustomize they use: there is no kustomize binary
in CI), their consistency with the service and with the runner's Job template, and the linters: kubernetes-validate
(strict, offline schemas), checkov and yamllint. Nothing here talks to a cluster."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from .deploy_tools import ROOT, run_tool

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "training", "multinode")
NAMESPACE = "lora-scripts"
# the oldest release we support (podFailurePolicy and podReplacementPolicy are GA or beta-on there) and the newest
# kubernetes-validate 1.37.0 ships offline schemas for
K8S_VERSIONS = ("1.31.0", "1.37.0")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
CRD_KINDS = {("kubeflow.org/v1", "PyTorchJob")}  # no schema in kubernetes-validate: checked by PYTORCHJOB_SCHEMA
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"
KNOWN_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}


# --- a renderer for the kustomize subset we use ---------------------------------------------------------------------
def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    if "template" in spec:
        return [spec["template"]["spec"]]
    return []


def render(folder: Path) -> list[dict[str, Any]]:
    """``kustomize build folder`` for: resources (files and folders with a kustomization), namespace, labels
    (metadata only, like kustomize without includeSelectors/includeTemplates) and images. Any other key fails."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kust) - KNOWN_KEYS
    assert not unknown, f"{folder}: kustomization uses {unknown}, which this test's renderer does not render"
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        path = (folder / entry).resolve()
        docs.extend(render(path) if path.is_dir() else copy.deepcopy(load_docs(path)))
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if kust.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for group in kust.get("labels", []):
            assert not group.get("includeSelectors") and not group.get("includeTemplates")
            meta.setdefault("labels", {}).update(group["pairs"])
        for image in kust.get("images", []):
            for pod in _pod_specs(doc):
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    name = container["image"].split("@")[0].rsplit(":", 1)[0]
                    if name == image["name"]:
                        new = image.get("newName", name)
                        if image.get("digest"):
                            container["image"] = f"{new}@{image['digest']}"
                        else:
                            tag = image.get("newTag") or container["image"][len(name) + 1:] or "latest"
                            container["image"] = f"{new}:{tag}"
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def runner_manifest() -> dict[str, Any]:
    """The Job the kubernetes runner submits for job 'example' with the base's settings."""
    from lora_scripts.service.k8s_runner import load_template, render_job

    return render_job(load_template(), "example", home=Path("/data/home"), image="lora-scripts:latest",
                      namespace=NAMESPACE, claim="lora-scripts-data", data_path="/data", worker="kubernetes")


def write_docs(folder: Path, docs: list[dict[str, Any]]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        paths.append(str(path))
    return paths


def pytorchjob_pod_as_job(doc: dict[str, Any], replica: str) -> dict[str, Any]:
    """A PyTorchJob replica's pod template inside a batch/v1 Job, so that the core linters check the pod."""
    template = copy.deepcopy(doc["spec"]["pytorchReplicaSpecs"][replica]["template"])
    template["spec"]["restartPolicy"] = "Never"
    # the label the operator puts on the pods of a PyTorchJob (its NetworkPolicy selects them by it)
    template["metadata"]["labels"]["training.kubeflow.org/job-name"] = doc["metadata"]["name"]
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"{doc['metadata']['name']}-{replica.lower()}", "namespace": NAMESPACE,
                         "annotations": {k: v for k, v in runner_manifest()["metadata"]["annotations"].items()
                                         if k.startswith("checkov.io/")}},
            "spec": {"template": template}}


# --- structure ----------------------------------------------------------------------------------------------------
def test_every_file_is_referenced_and_exists():
    referenced = set()
    for name in KUSTOMIZATIONS:
        kust = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        for entry in kust["resources"]:
            path = (K8S / name / entry).resolve()
            assert path.exists(), f"{name}/kustomization.yaml names {entry}, which does not exist"
            referenced.add(path)
    yaml_files = {p.resolve() for p in K8S.rglob("*.y*ml") if p.name != "kustomization.yaml"}
    assert yaml_files - referenced == set(), "files no kustomization applies"
    kustomizations = {p.parent.name for p in K8S.rglob("kustomization.yaml")}
    assert kustomizations == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_namespace_labels_and_images_are_applied(name):
    docs = render(K8S / name)
    assert docs
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lora-scripts"
        for pod in _pod_specs(doc):
            assert [c["image"] for c in pod["containers"]] == ["lora-scripts:latest"]


def test_an_overlay_can_pin_the_image(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    digest = "sha256:" + "0" * 64
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "images": [{"name": "lora-scripts", "newName": "registry.example/lora-scripts", "digest": digest}]}))
    deployment = find(render(overlay), "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"registry.example/lora-scripts@{digest}"


def test_the_service_deployment_fits_the_runner_and_the_rbac():
    from lora_scripts.service.k8s_runner import SERVICE_CONTAINER, template_data_path

    docs = render(K8S / "base")
    deployment, config = find(docs, "Deployment"), find(docs, "ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == SERVICE_CONTAINER
    args = container["args"]
    assert args[:1] == ["serve"] and args[args.index("--runner") + 1] == "kubernetes"
    assert args[args.index("--port") + 1] == "7860" and args[args.index("--host") + 1] == "0.0.0.0"
    home = args[args.index("--home") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the home is on the shared claim, mounted where the training Jobs mount it
    assert home.startswith(mounts["data"] + "/") and mounts["data"] == config["LORA_SCRIPTS_K8S_DATA_PATH"]
    assert config["LORA_SCRIPTS_K8S_DATA_PATH"] == template_data_path(runner_manifest())
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    pvc = find(docs, "PersistentVolumeClaim")
    assert claim == pvc["metadata"]["name"] == config["LORA_SCRIPTS_K8S_PVC"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and "storageClassName" not in pvc["spec"]
    assert "emptyDir" in volumes["tmp"] and mounts["tmp"] == "/tmp"
    assert config["LORA_SCRIPTS_WORKER_ID"]  # stable across pod restarts, for re-attaching
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    # probes, port, security
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"] == [{"name": "http", "containerPort": 7860, "protocol": "TCP"}]
    service = find(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 7860
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    sc = container["securityContext"]
    assert (sc["runAsNonRoot"], sc["runAsUser"], sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"]) == \
        (True, 10001, True, False)
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert all(container["resources"][k] for k in ("requests", "limits"))
    # the token is mounted, for the service account that the Role allows exactly the runner's calls
    assert pod["automountServiceAccountToken"] is True
    account = pod["serviceAccountName"]
    binding = find(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    role = find(docs, "Role", binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role"
    # its verbs are the runner's recorded calls: test_k8s_runner.py::test_the_role_grants_exactly_what_the_runner_calls
    assert all(r["apiGroups"] in ([""], ["batch"]) and "*" not in r["verbs"] for r in role["rules"])
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_the_example_job_is_the_runners_job():
    """deploy/k8s/training/train-job.yaml and the packaged template cannot drift: the runner's Job for job
    'example' has exactly the example's spec (backoffLimit, podFailurePolicy, security contexts, resources,
    volumes, args)."""
    example = find(render(K8S / "training"), "Job")
    ours = runner_manifest()
    assert ours["spec"] == example["spec"]
    assert ours["metadata"]["name"] == example["metadata"]["name"]
    spec = example["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    assert container["args"] == ["train", "--config", "/data/home/jobs/example/config.yaml", "--resume", "latest",
                                 "--no-progress"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "LORA_SCRIPTS_INTERRUPTED_EXIT_CODE", "value": "143"} in container["env"]


def test_exit_code_2_is_the_trainers_bad_input_exit():
    """podFailurePolicy fails the Job at once on exit code 2: that must stay what `lora-scripts train` returns for
    a user error (and not for anything retryable)."""
    from lora_scripts.cli import main
    from lora_scripts.errors import ConfigError, DataError, OutOfMemory, UserError

    assert UserError.exit_code == ConfigError.exit_code == DataError.exit_code == 2
    assert OutOfMemory.exit_code != 2
    assert main(["train", "--config", str(ROOT / "no-such-config.yaml")]) == 2


# --- the CRD: our own schema for the fields we use ----------------------------------------------------------------
_CONTAINER = {"type": "object", "required": ["name", "image"],
              "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                             "command": {"type": "array", "items": {"type": "string"}},
                             "args": {"type": "array", "items": {"type": "string"}}}}
_REPLICA = {
    "type": "object", "required": ["replicas", "template"], "additionalProperties": False,
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": {"type": "object", "required": ["spec"], "properties": {"spec": {
            "type": "object", "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER,
                                          "contains": {"properties": {"name": {"const": "pytorch"}}}}}}}}}}
# kubeflow.org/v1 PyTorchJob, the fields deploy/k8s/multinode uses (Training Operator v1.7+ API)
PYTORCHJOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}}},
        "spec": {"type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
                 "properties": {
                     "nprocPerNode": {"type": "string", "pattern": "^([0-9]+|auto|cpu|gpu)$"},
                     "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                         "backoffLimit": {"type": "integer", "minimum": 0},
                         "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                         "ttlSecondsAfterFinished": {"type": "integer"},
                         "activeDeadlineSeconds": {"type": "integer"}}},
                     "elasticPolicy": {"type": "object"},
                     "pytorchReplicaSpecs": {"type": "object", "required": ["Master"], "additionalProperties": False,
                                             "properties": {"Master": _REPLICA, "Worker": _REPLICA}}}}}}


def test_the_pytorchjob_matches_our_schema_and_its_pods_match_the_trainers():
    jsonschema = pytest.importorskip("jsonschema")
    doc = find(render(K8S / "multinode"), "PyTorchJob")
    jsonschema.validate(doc, PYTORCHJOB_SCHEMA)
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        # a GPU per process on every node
        assert container["resources"]["limits"]["nvidia.com/gpu"] == doc["spec"]["nprocPerNode"]
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert args[args.index("-m") + 1:args.index("-m") + 3] == ["lora_scripts.cli", "train"]
        assert args[-3:] == ["--resume", "latest", "--no-progress"]
        # same security and volume layout as the single-pod Job
        job_pod = runner_manifest()["spec"]["template"]["spec"]
        assert pod["securityContext"] == job_pod["securityContext"]
        assert container["securityContext"] == job_pod["containers"][0]["securityContext"]
        assert [v["name"] for v in pod["volumes"]] == [v["name"] for v in job_pod["volumes"]]
        assert pod["volumes"][0] == job_pod["volumes"][0]  # the shared claim
        assert container["volumeMounts"] == job_pod["containers"][0]["volumeMounts"]
        assert replica["restartPolicy"] == "ExitCode"


# --- linters ------------------------------------------------------------------------------------------------------
def _core_docs() -> list[dict[str, Any]]:
    docs = [d for name in KUSTOMIZATIONS for d in render(K8S / name)
            if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    pytorchjob = find(render(K8S / "multinode"), "PyTorchJob")
    return [*docs, runner_manifest(), *(pytorchjob_pod_as_job(pytorchjob, r) for r in ("Master", "Worker"))]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_validate_strict(tmp_path, version):
    """Every core object we apply, the runner's Job and the PyTorchJob's pods, against the offline schemas."""
    paths = write_docs(tmp_path / "docs", _core_docs())
    res = run_tool("kubernetes-validate", "--strict", "--kubernetes-version", version, "--quiet", *paths)
    assert res.returncode == 0, res.stdout + res.stderr
    # and the files themselves (kustomization.yaml has no schema: a warning, not a failure)
    files = [str(p) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"
             and "multinode" not in p.parts]
    res = run_tool("kubernetes-validate", "--strict", "--kubernetes-version", version, "--quiet", *files)
    assert res.returncode == 0, res.stdout + res.stderr


def _checkov(target: Path) -> dict[str, Any]:
    res = run_tool("checkov", "-d", str(target), "--framework", "kubernetes", "--skip-download", "--quiet",
                   "--output", "json")
    report = json.loads(res.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [f"{c['check_id']} {c['resource']} {c['file_path']}" for r in reports
              for c in r.get("results", {}).get("failed_checks", [])]
    assert res.returncode == 0 and not failed, "\n".join(failed) or res.stderr[-3000:]
    return reports[0]["summary"]


def test_checkov_passes_on_the_manifests(tmp_path):
    summary = _checkov(K8S)
    assert summary["passed"] > 100 and summary["resource_count"] >= 12


def test_checkov_passes_on_the_runners_job_and_the_pytorchjob_pods(tmp_path):
    pytorchjob = find(render(K8S / "multinode"), "PyTorchJob")
    # with the NetworkPolicies they run under (CKV2_K8S_6 wants every pod covered by one)
    policies = [d for name in KUSTOMIZATIONS for d in render(K8S / name) if d["kind"] == "NetworkPolicy"]
    write_docs(tmp_path / "rendered", [runner_manifest(), pytorchjob_pod_as_job(pytorchjob, "Master"), *policies])
    assert _checkov(tmp_path / "rendered")["passed"] > 20


def test_every_checkov_skip_is_an_annotation_with_a_reason():
    for path in [*K8S.rglob("*.yaml"), ROOT / "lora_scripts" / "service" / "k8s_job_template.yaml"]:
        for doc in load_docs(path):
            for key, value in ((doc.get("metadata") or {}).get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    assert check.startswith("CKV") and len(reason) > 20, f"{path}: {key}: {value}"
        assert "#checkov:skip" not in path.read_text()


def test_yamllint():
    res = run_tool("yamllint", "--strict", "-f", "parsable", "-d", YAMLLINT_CONFIG, str(K8S),
                   str(ROOT / "lora_scripts" / "service" / "k8s_job_template.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
