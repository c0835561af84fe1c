"""A fake Kubernetes API server for the kubernetes runner's tests: the parts of batch/v1 Jobs and core/v1 pods the
runner uses, over real HTTP on 127.0.0.1, so the official client's real requests are exercised. It records every
request and lets a test play the cluster: start a Job's pod, log lines, finish it, lose it."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

_JOBS = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs$")
_JOB = re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs/([^/]+)(/status)?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
_POD = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")
_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeKube:
    """Jobs and pods in memory behind an HTTP server on a random loopback port."""

    def __init__(self, namespace: str = "lora-scripts") -> None:
        self.namespace = namespace
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []  # {method, path, query, body}
        self.lock = threading.RLock()
        self.fail_next: int | None = None  # answer the next request with this status
        self._pod_count = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake.lock:
                    fake.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                          "body": body})
                    if fake.fail_next is not None:
                        status, fake.fail_next = fake.fail_next, None
                        return self._send(status, _status(status, "injected failure"))
                    status, payload = fake.route(self.command, url.path, parse_qs(url.query), body)
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file that points the client at this server."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}],
        }))
        return path

    # --- the API ------------------------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if (m := _JOBS.match(path)) and method == "POST":
            name = body["metadata"]["name"]
            if name in self.jobs:
                return 409, _status(409, f'jobs.batch "{name}" already exists', "AlreadyExists")
            job = json.loads(json.dumps(body))
            job["metadata"].update(namespace=m.group(1), uid=f"uid-{name}", creationTimestamp=_now())
            job["status"] = {}
            self.jobs[name] = job
            return 201, job
        if m := _JOB.match(path):
            name = m.group(2)
            job = self.jobs.get(name)
            if job is None:
                return 404, _status(404, f'jobs.batch "{name}" not found', "NotFound")
            if method == "GET":
                if job["metadata"].get("deletionTimestamp"):
                    # a Foreground delete: the Job is answered once more (its pod is terminating), then it is gone
                    self.remove_job(name)
                return 200, job
            if method == "DELETE":
                policy = (body or {}).get("propagationPolicy") or query.get("propagationPolicy", [None])[0]
                if policy == "Foreground":
                    job["metadata"]["deletionTimestamp"] = _now()
                else:
                    self.remove_job(name)
                return 200, _status(200, "deleted", "Success")
        if (m := _PODS.match(path)) and method == "GET":
            selector = dict(part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if part)
            items = [p for p in self.pods.values()
                     if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
        if (m := _LOG.match(path)) and method == "GET":
            if m.group(2) not in self.logs:
                return 400, _status(400, "container is waiting to start", "BadRequest")
            return 200, self.logs[m.group(2)]
        if (m := _POD.match(path)) and method == "GET":
            pod = self.pods.get(m.group(2))
            return (200, pod) if pod else (404, _status(404, "pod not found", "NotFound"))
        return 404, _status(404, f"the fake has no {method} {path}", "NotFound")

    # --- playing the cluster ------------------------------------------------------------------------------------
    def start_pod(self, job_name: str, log: bytes = b"", node: str = "gpu-node-1") -> str:
        """The Job's controller created a pod and it runs, having logged ``log``."""
        with self.lock:
            job = self.jobs[job_name]
            self._pod_count += 1
            name = f"{job_name}-{self._pod_count:05d}"
            template = job["spec"]["template"]
            self.pods[name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": self.namespace, "creationTimestamp": _now(),
                             "labels": dict(template["metadata"]["labels"], **{"job-name": job_name})},
                "spec": {"nodeName": node, "containers": template["spec"]["containers"]},
                "status": {"phase": "Running", "containerStatuses": [
                    {"name": "trainer", "state": {"running": {"startedAt": _now()}}}]},
            }
            self.logs[name] = log
            return name

    def pending_pod(self, job_name: str, message: str) -> str:
        """The Job's pod cannot be scheduled."""
        with self.lock:
            name = self.start_pod(job_name)
            del self.logs[name]
            self.pods[name]["spec"].pop("nodeName")
            self.pods[name]["status"] = {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}
            return name

    def log(self, pod: str, more: bytes) -> None:
        with self.lock:
            self.logs[pod] = self.logs.get(pod, b"") + more

    def finish(self, job_name: str, pod: str, exit_code: int, message: str = "", reason: str = "") -> None:
        """The pod's trainer exited with ``exit_code``; the Job is Complete (0) or Failed."""
        with self.lock:
            self.pods[pod]["status"] = {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message,
                                                             "reason": "Completed" if exit_code == 0 else "Error"}}}]}
            kind = "Complete" if exit_code == 0 else "Failed"
            self.jobs[job_name]["status"] = {"conditions": [
                {"type": kind, "status": "True", "reason": reason or kind, "lastTransitionTime": _now()}],
                "succeeded" if exit_code == 0 else "failed": 1}

    def remove_job(self, name: str) -> None:
        with self.lock:
            self.jobs.pop(name, None)
            for pod in [p for p, v in self.pods.items() if v["metadata"]["labels"].get("job-name") == name]:
                del self.pods[pod]

    def rbac_rules(self) -> dict[tuple[str, str], set[str]]:
        """The RBAC (apiGroup, resource) -> verbs that the recorded requests needed, as the API server authorises
        them: POST create, GET of one object get, GET of a collection list (watch with ?watch=true), DELETE delete."""
        needed: dict[tuple[str, str], set[str]] = {}
        with self.lock:
            requests = list(self.requests)
        for r in requests:
            path, method = r["path"], r["method"]
            if _LOG.match(path):
                key, one = ("", "pods/log"), True
            elif _POD.match(path) or _PODS.match(path):
                key, one = ("", "pods"), bool(_POD.match(path))
            elif _JOB.match(path) or _JOBS.match(path):
                key, one = ("batch", "jobs"), bool(_JOB.match(path))
            else:
                raise AssertionError(f"unexpected request {method} {path}")
            if method == "GET":
                verb = "get" if one else ("watch" if r["query"].get("watch") == ["true"] else "list")
            else:
                verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[method]
            needed.setdefault(key, set()).add(verb)
        return needed

    def calls(self, method: str, path_part: str = "") -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == method and path_part in r["path"]]


def _status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" if code < 400 else "Failure",
            "message": message, "reason": reason, "code": code}
