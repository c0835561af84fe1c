"""deploy/spinnaker: the pipelines and the Kayenta canary config against our schemas, the canary pipeline's stage graph
(order, failure handling), the canary metrics against what the service really exports, and the HTTP metrics the
canary relies on (lora_scripts/service/metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from .deploy_tools import ROOT, run_tool

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")

SPIN = ROOT / "deploy" / "spinnaker"
PIPELINES = ("pipeline-service.json", "pipeline-train.json")
NAMESPACE, DEPLOYMENT, PORT = "lora-scripts", "lora-scripts", 7860


def load(name: str) -> dict:
    return json.loads((SPIN / name).read_text(encoding="utf-8"))


def validator(schema_name: str):
    schema = load(f"schema/{schema_name}")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def make_client(home: Path):
    from fastapi.testclient import TestClient

    from lora_scripts.service.app import ServiceSettings, create_app

    return TestClient(create_app(ServiceSettings(home=home, token="test-token", run_jobs=False)),
                      raise_server_exceptions=False, base_url="http://localhost")  # a Host the server serves


# --- schemas -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PIPELINES)
def test_pipelines_match_the_schema(name):
    errors = sorted(validator("pipeline.schema.json").iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_canary_config_matches_the_schema():
    errors = sorted(validator("canary-config.schema.json").iter_errors(load("canary-config.json")), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_catches_a_stage_without_its_required_fields():
    pipeline = load("pipeline-service.json")
    promote = next(s for s in pipeline["stages"] if s["type"] == "patchManifest")
    del promote["manifestName"]
    rollback = next(s for s in pipeline["stages"] if s["type"] == "undoRolloutManifest")
    rollback["stageEnabled"]["expression"] = "${true}"  # Orca adds ${...} itself: a wrapped one never evaluates
    messages = [e.message for e in validator("pipeline.schema.json").iter_errors(pipeline)]
    assert any("'manifestName' is a required property" in m for m in messages), messages
    assert any("should not be valid" in m for m in messages), messages


# --- stage graph -------------------------------------------------------------------------------------------------

def graph(pipeline: dict) -> tuple[dict[str, dict], dict[str, list[str]]]:
    stages = {s["refId"]: s for s in pipeline["stages"]}
    assert len(stages) == len(pipeline["stages"]), "refIds must be unique"
    parents = {ref: list(s["requisiteStageRefIds"]) for ref, s in stages.items()}
    for ref, deps in parents.items():
        for dep in deps:
            assert dep in stages, f"stage {ref} waits for unknown refId {dep}"
    roots = [ref for ref, deps in parents.items() if not deps]
    assert len(roots) == 1, f"one root stage expected, found {roots}"
    return stages, parents


def ancestors(parents: dict[str, list[str]], ref: str, seen: tuple[str, ...] = ()) -> set[str]:
    assert ref not in seen, f"cycle through {' -> '.join(seen + (ref,))}"
    out = set()
    for dep in parents[ref]:
        out |= {dep} | ancestors(parents, dep, seen + (ref,))
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_stage_graph_is_a_rooted_acyclic_graph(name):
    stages, parents = graph(load(name))
    for ref in stages:
        ancestors(parents, ref)


STAGE_REF = re.compile(r"#stage\('([^']+)'\)\['status'\]\.toString\(\) (==|!=) '([A-Z_]+)'")


def test_canary_order_and_failure_handling():
    stages, parents = graph(load("pipeline-service.json"))
    by_type: dict[str, list[str]] = {}
    for ref, stage in stages.items():
        by_type.setdefault(stage["type"], []).append(ref)
    (deploy,), (canary,) = by_type["deployManifest"], by_type["kayentaCanary"]
    (promote,), (rollback,) = by_type["patchManifest"], by_type["undoRolloutManifest"]
    (delete,), (final,) = by_type["deleteManifest"], by_type["checkPreconditions"]
    names = {s["name"]: ref for ref, s in stages.items()}
    assert len(names) == len(stages), "stage names must be unique: expressions refer to stages by name"

    # order: deploy canary -> analysis -> promote -> (rollback) -> delete canary -> final verdict
    assert deploy in ancestors(parents, canary)
    assert canary in ancestors(parents, promote)
    assert promote in ancestors(parents, rollback)
    assert rollback in ancestors(parents, delete) and delete in ancestors(parents, final)

    # the deployed canary is the new image, a separate Deployment in the service's namespace, on the service's port
    (manifest,) = stages[deploy]["manifests"]
    assert manifest["kind"] == "Deployment" and manifest["metadata"]["name"] == f"{DEPLOYMENT}-canary"
    assert manifest["metadata"]["namespace"] == NAMESPACE
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "${parameters.image}" and "--no-runner" in container["args"]
    assert container["ports"][0]["containerPort"] == PORT
    assert stages[delete]["manifestName"] == f"deployment {DEPLOYMENT}-canary"
    assert stages[promote]["manifestName"] == stages[rollback]["manifestName"] == f"deployment {DEPLOYMENT}"
    assert stages[promote]["location"] == stages[rollback]["location"] == NAMESPACE
    patched = stages[promote]["patchBody"]["spec"]["template"]["spec"]["containers"][0]
    assert patched == {"name": container["name"], "image": "${parameters.image}"}

    # each gated stage runs on the status of the stage before it, named by an existing stage name
    def gate(ref: str) -> tuple[str, str, str]:
        match = STAGE_REF.fullmatch(stages[ref]["stageEnabled"]["expression"])
        assert match, stages[ref]["stageEnabled"]["expression"]
        assert match.group(1) in names, f"{ref} refers to unknown stage {match.group(1)!r}"
        return names[match.group(1)], match.group(2), match.group(3)

    assert gate(canary) == (deploy, "==", "SUCCEEDED")
    assert gate(promote) == (canary, "==", "SUCCEEDED")
    # the rollback runs only when the promotion failed (never after a success, nor when promote was skipped)
    assert gate(rollback) == (promote, "==", "FAILED_CONTINUE")
    assert "stageEnabled" not in stages[delete], "the canary is removed whatever happened"

    # a failure of a gating stage must not stop the pipeline (the clean-up has to run): "ignore the failure"...
    for ref in (deploy, canary, promote, rollback):
        assert stages[ref]["failPipeline"] is False and stages[ref]["continuePipeline"] is True, ref
    # ...and the last stage turns any of them into a failed execution
    (pre,) = stages[final]["preconditions"]
    assert pre["failPipeline"] is True
    match = STAGE_REF.fullmatch(pre["context"]["expression"][2:-1])
    assert match and names[match.group(1)] == promote and match.group(2, 3) == ("==", "SUCCEEDED")
    assert stages[canary]["canaryConfig"]["canaryConfigId"] == load("canary-config.json")["id"]


def test_training_job_runs_the_trainer_on_a_gpu():
    (stage,) = load("pipeline-train.json")["stages"]
    assert stage["type"] == "runJobManifest"
    job = stage["manifest"]
    assert job["metadata"]["namespace"] == NAMESPACE
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "${parameters.image}"
    assert container["args"][:3] == ["train", "--config", "${parameters.config}"]
    assert container["args"][3:5] == ["--resume", "latest"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (deploy/docker/Dockerfile)


def test_inline_manifests_are_valid_kubernetes(tmp_path):
    manifests = [load("pipeline-train.json")["stages"][0]["manifest"]]
    manifests += [m for s in load("pipeline-service.json")["stages"] for m in s.get("manifests", [])]
    files = []
    for i, manifest in enumerate(manifests):
        manifest = json.loads(json.dumps(manifest))
        if "generateName" in manifest["metadata"]:  # the validator wants a name; Kubernetes generates it
            manifest["metadata"]["name"] = manifest["metadata"]["generateName"] + "x"
        path = tmp_path / f"manifest-{i}.yaml"
        path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
        files.append(str(path))
    proc = run_tool("kubernetes-validate", "--strict", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- canary metrics ----------------------------------------------------------------------------------------------

def exported_metrics(tmp_path) -> set[str]:
    """Every sample name the service's /metrics renders after some traffic."""
    with make_client(tmp_path / "home") as client:
        client.get("/healthz")
        client.get("/api/jobs/nope", headers={"Authorization": "Bearer test-token"})
        text = client.get("/metrics", headers={"Authorization": "Bearer test-token"}).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


PROMQL_WORDS = {"sum", "rate", "by", "le", "max", "histogram_quantile", "namespace", "pod", "status", "route",
                "location", "scope"}


def test_every_canary_query_names_a_metric_the_service_exports(tmp_path):
    exported = exported_metrics(tmp_path)
    config = load("canary-config.json")
    for metric in config["metrics"]:
        query = metric["query"]
        promql = query["customInlineTemplate"].removeprefix("PromQL:")
        names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", promql))
        assert names, f"{metric['name']}: no metric selector in {promql}"
        words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", re.sub(r'"[^"]*"', '""', promql))) - PROMQL_WORDS
        assert words <= names, f"{metric['name']}: unexpected identifiers {words - names}"
        for name in names:
            assert name in exported, f"{metric['name']}: {name} is not in the service's /metrics"
        base = query["metricName"]
        assert any(n == base or n.startswith(base + "_") for n in names), (metric["name"], base, names)
        # every query is scoped to one side of the comparison
        assert 'pod=~"${scope}"' in promql and 'namespace="${location}"' in promql, metric["name"]
    weights = config["classifier"]["groupWeights"]
    assert sum(weights.values()) == 100
    assert {g for m in config["metrics"] for g in m["groups"]} == set(weights)
    assert any(m["analysisConfigurations"]["canary"].get("critical") for m in config["metrics"])


def test_http_metrics_count_requests_by_route_template_and_status(tmp_path):
    with make_client(tmp_path / "home") as client:
        app = client.app

        @app.get("/boom-for-test")
        def boom() -> None:
            raise RuntimeError("boom")

        auth = {"Authorization": "Bearer test-token"}
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/jobs/abc", headers=auth).status_code == 404
        assert client.get("/api/jobs/def", headers=auth).status_code == 404
        assert client.post("/api/jobs", json={}).status_code == 401
        assert client.get("/static/console.css").status_code == 200
        assert client.get("/no/such/page").status_code == 404
        assert client.get("/boom-for-test").status_code == 500
        text = client.get("/metrics", headers={"Authorization": "Bearer test-token"}).text

    def value(sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        assert match, f"{sample} not in /metrics:\n{text}"
        return float(match.group(1))

    counter = "lora_http_requests_total"
    assert value(f'{counter}{{method="GET",route="/healthz",status="200"}}') == 1
    # the route template, not the two raw paths: cardinality stays bounded
    assert value(f'{counter}{{method="GET",route="/api/jobs/{{job_id}}",status="404"}}') == 2
    assert "/api/jobs/abc" not in text
    assert value(f'{counter}{{method="POST",route="/api/jobs",status="401"}}') == 1
    assert value(f'{counter}{{method="GET",route="/static/{{path}}",status="200"}}') == 1
    assert value(f'{counter}{{method="GET",route="unmatched",status="404"}}') == 1
    assert value(f'{counter}{{method="GET",route="/boom-for-test",status="500"}}') == 1
    histogram = "lora_http_request_duration_seconds"
    assert "# TYPE lora_http_request_duration_seconds histogram" in text
    assert value(f'{histogram}_count{{method="GET",route="/api/jobs/{{job_id}}"}}') == 2
    assert value(f'{histogram}_bucket{{le="+Inf",method="GET",route="/api/jobs/{{job_id}}"}}') == 2
    assert value(f'{histogram}_sum{{method="GET",route="/healthz"}}') > 0
    assert "lora_jobs{" in text and "process_resident_memory_bytes" in text  # the job gauges are still there


def test_each_app_counts_its_own_requests(tmp_path):
    """A registry per app: a second app in the same process starts from zero (and creating it does not raise)."""
    with make_client(tmp_path / "a") as first:
        first.get("/healthz")
        first.get("/healthz")
    with make_client(tmp_path / "b") as second:
        second.get("/healthz")
        text = second.get("/metrics", headers={"Authorization": "Bearer test-token"}).text
    assert 'lora_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
