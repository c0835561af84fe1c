"""The kubernetes runner (``lora-scripts serve --runner kubernetes``): every claimed job becomes a batch/v1 Job.

- The Job comes from ``k8s_job_template.yaml`` (package data; ``LORA_SCRIPTS_K8S_JOB_TEMPLATE`` names another file).
  It runs the same ``lora-scripts train --config <home>/jobs/<id>/config.yaml --resume latest --no-progress`` as the
  local runner. The home must lie on the ReadWriteMany volume that the service pod and the Job pods both mount at
  the same path (``/data`` by default), so the config path, datasets and outputs mean the same thing in both.
- The Job is named ``lora-train-<job id>`` (RFC 1123, at most 63 characters) and labelled with the job id, so a
  restarted server finds it again: jobs this worker left ``running`` are re-attached when their Job still exists
  and requeued (they resume from their latest checkpoint) when it is gone. Nothing is submitted twice.
- Its state is followed by polling: condition ``Complete`` -> succeeded, ``Failed`` -> failed with the trainer's
  exit code and its one-line ``error: ...`` (from the termination message, which falls back to the log tail).
  Retries, disruptions and bad input are the Job's ``backoffLimit`` and ``podFailurePolicy``, not ours.
- The pods' logs are copied, append-only, into ``<home>/jobs/<id>/train.log`` while they run and at the end, so the
  console and ``GET /api/jobs/{id}/log`` work as with local jobs (byte offsets stay valid).
- Cancel deletes the Job with ``propagationPolicy=Foreground``: the Job object stays until its pod has stopped
  (SIGTERM, the trainer checkpoints), and only then is the job marked cancelled. So "cancelled" means no trainer
  runs any more, and a Resume right after can neither overlap the old pod nor collide with the old Job's name.
- Stopping the server leaves the Jobs running; the next server re-attaches to them.

The ``kubernetes`` client is imported here only, and this module only when ``--runner kubernetes`` is chosen.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .runner import PollingLoop, job_dir, sanitise_error
from .security import is_inside
from .store import JobStore

TEMPLATE = Path(__file__).with_name("k8s_job_template.yaml")
CONTAINER = "trainer"  # the container podFailurePolicy's onExitCodes names
DATA_VOLUME = "data"  # the RWX volume in the template
JOB_ID_LABEL = "lora-scripts.io/job-id"
JOB_ID_ANNOTATION = "lora-scripts.io/job-id"  # the full id, where the label had to be a hash
SERVICE_CONTAINER = "lora-scripts"  # the service's container in deploy/k8s/base/deployment.yaml
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOG_SYNC_SECONDS = 5.0  # how often a running job's pod log is copied into train.log
LOG_STATE = "k8s-log.json"  # per job: bytes of each pod's log already copied
REQUEST_TIMEOUT = 30  # seconds per API call: a hung API server must not hang the runner
_NAME_PREFIX = "lora-train-"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


def job_name(job_id: str) -> str:
    """The Kubernetes name of a job's Job: ``lora-train-<id>``, a valid RFC 1123 label (lowercase alphanumerics
    and '-', at most 63). An id that does not fit as it is gets a hash suffix, so two ids never share a name."""
    clean = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    name = _NAME_PREFIX + clean
    if clean != job_id or len(name) > 63:
        digest = hashlib.sha256(job_id.encode()).hexdigest()[:10]
        name = (_NAME_PREFIX + clean)[:52].rstrip("-") + "-" + digest
    return name


def job_label(job_id: str) -> str:
    """The value of the job-id label: the id itself when it is a valid label value, else a hash of it."""
    return job_id if _LABEL_VALUE.match(job_id) else hashlib.sha256(job_id.encode()).hexdigest()[:32]


def load_template(path: str | Path | None = None) -> dict[str, Any]:
    """The Job template (default: the packaged one), checked for the parts the runner fills in."""
    path = Path(path) if path else TEMPLATE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        containers = data["spec"]["template"]["spec"]["containers"]
        volumes = data["spec"]["template"]["spec"]["volumes"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigError(f"Kubernetes Job template {path}: cannot be read as a batch/v1 Job ({exc})") from None
    if data.get("kind") != "Job" or not any(c.get("name") == CONTAINER for c in containers):
        raise ConfigError(f"Kubernetes Job template {path}: must be a Job with a container named '{CONTAINER}'")
    if not any(v.get("name") == DATA_VOLUME and "persistentVolumeClaim" in v for v in volumes):
        raise ConfigError(f"Kubernetes Job template {path}: needs a volume '{DATA_VOLUME}' (the shared RWX claim)")
    return data


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in manifest["spec"]["template"]["spec"]["containers"] if c["name"] == CONTAINER)


def template_data_path(template: dict[str, Any]) -> str:
    """Where the template mounts the shared volume in the trainer (``/data``)."""
    mounts = _container(template).get("volumeMounts") or []
    return next((m["mountPath"] for m in mounts if m["name"] == DATA_VOLUME), "/data")


def render_job(
    template: dict[str, Any], job_id: str, *, home: Path, image: str, namespace: str | None = None,
    claim: str | None = None, data_path: str | None = None, worker: str | None = None,
) -> dict[str, Any]:
    """The Job manifest of one job: the template with its name, labels, image, command line, working folder and
    (optionally) claim name and mount path filled in."""
    manifest = copy.deepcopy(template)
    folder = job_dir(home, job_id)
    meta = manifest.setdefault("metadata", {})
    meta["name"] = job_name(job_id)
    if namespace:
        meta["namespace"] = namespace
    meta.setdefault("labels", {})[JOB_ID_LABEL] = job_label(job_id)
    annotations = meta.setdefault("annotations", {})
    annotations[JOB_ID_ANNOTATION] = job_id
    if worker:
        annotations["lora-scripts.io/worker"] = worker
    pod = manifest["spec"]["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {})[JOB_ID_LABEL] = job_label(job_id)
    container = _container(manifest)
    container["image"] = image
    # the local runner's command (runner.DEFAULT_COMMAND) minus the interpreter: the image's entrypoint is lora-scripts
    container["args"] = ["train", "--config", str(folder / "config.yaml"), "--resume", "latest", "--no-progress"]
    container["workingDir"] = str(folder)
    env = container.setdefault("env", [])
    entry = next((e for e in env if e["name"] == "LORA_SCRIPTS_JOB_ID"), None)
    if entry is None:
        env.append({"name": "LORA_SCRIPTS_JOB_ID", "value": job_id})
    else:
        entry.clear()
        entry.update(name="LORA_SCRIPTS_JOB_ID", value=job_id)
    for volume in pod["spec"]["volumes"]:
        if volume["name"] == DATA_VOLUME and claim:
            volume["persistentVolumeClaim"]["claimName"] = claim
    for mount in container.get("volumeMounts", []):
        if mount["name"] == DATA_VOLUME and data_path:
            mount["mountPath"] = data_path
    return manifest


def load_api_client(kubeconfig: str | None) -> Any:
    """A ``kubernetes.client.ApiClient`` from ``kubeconfig``, else from the pod's service account (in-cluster).
    Raises :class:`ConfigError` (one line, exit 2) when neither can be loaded."""
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise ConfigError("--runner kubernetes needs the Kubernetes client: pip install 'lora-scripts[kubernetes]'") \
            from None
    if kubeconfig:
        if not Path(kubeconfig).expanduser().is_file():
            raise ConfigError(f"--k8s-kubeconfig: {kubeconfig} does not exist")
        try:
            return config.new_client_from_config(config_file=str(Path(kubeconfig).expanduser()))
        except (ConfigException, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"--k8s-kubeconfig: cannot use {kubeconfig}: {exc}") from None
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        raise ConfigError(f"--runner kubernetes: no Kubernetes configuration: not inside a cluster ({exc}) and no "
                          "--k8s-kubeconfig (or LORA_SCRIPTS_K8S_KUBECONFIG) given") from None
    return client.ApiClient(configuration)


def _condition(k8s_job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job's terminal condition (type Complete or Failed, status True), if it has one."""
    for cond in (k8s_job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _error_line(text: str | None) -> str | None:
    """The trainer's last one-line ``error: ...`` in ``text``, sanitised (it may quote a data file)."""
    for line in reversed((text or "").splitlines()):
        if line.startswith("error: "):
            return sanitise_error(line[len("error: "):])
    return None


@dataclass
class _Tracked:
    job_id: str
    name: str
    deleting: bool = False  # cancel: Job deleted (Foreground), waiting for it to disappear
    last_sync: float = 0.0
    note: str | None = None  # the last "pod waits" line written to the log


class KubernetesRunner(PollingLoop):
    """Runs queued jobs of ``store`` as Kubernetes Jobs, at most ``slots`` at a time; same interface as
    :class:`~lora_scripts.service.runner.Runner` (start, stop, wake, alive, tick, recover, running, started_jobs)."""

    def __init__(
        self, store: JobStore, home: Path, worker: str, slots: int | None = None, poll_seconds: float = 0.5,
        on_finish: Callable[[dict[str, Any]], None] | None = None, *, namespace: str | None = None,
        image: str | None = None, kubeconfig: str | None = None, claim: str | None = None,
        data_path: str | None = None, template: str | Path | None = None, api_client: Any = None,
    ) -> None:
        env = os.environ.get
        self.store, self.home, self.worker = store, Path(home), worker
        self.slots = slots or 1  # Jobs in the cluster at once; the rest wait in our queue (cancellable, ordered)
        self.poll_seconds, self.on_finish = poll_seconds, on_finish
        self.template = load_template(template or env("LORA_SCRIPTS_K8S_JOB_TEMPLATE"))
        self.namespace = namespace or env("LORA_SCRIPTS_K8S_NAMESPACE") or _own_namespace() or "default"
        self.image = image or env("LORA_SCRIPTS_K8S_IMAGE")
        self.claim = claim or env("LORA_SCRIPTS_K8S_PVC")  # default: the template's (lora-scripts-data)
        self.data_path = data_path or env("LORA_SCRIPTS_K8S_DATA_PATH") or template_data_path(self.template)
        if not is_inside(self.home, Path(self.data_path)):
            raise ConfigError(f"--home {self.home} is not on the shared volume the training Jobs mount at "
                              f"{self.data_path}: their config and output paths would not exist there (set "
                              "--home under it, or LORA_SCRIPTS_K8S_DATA_PATH)")
        if not self.image and not env("POD_NAME"):
            raise ConfigError("--runner kubernetes: no trainer image: pass --k8s-image (or LORA_SCRIPTS_K8S_IMAGE); "
                              "inside the cluster, POD_NAME (downward API) lets the service use its own image")
        self.api = api_client or load_api_client(kubeconfig or env("LORA_SCRIPTS_K8S_KUBECONFIG"))
        from kubernetes import client

        self.batch, self.core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        self.running: dict[str, _Tracked] = {}
        self.reattached: list[str] = []
        self.started_jobs = 0
        self.log_sync_seconds = LOG_SYNC_SECONDS
        self._recovered = False
        self._init_loop()

    thread_name = "lora-k8s-runner"

    # --- life cycle (as Runner) ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Run in a background thread; its first round re-attaches to the Jobs a previous server left (and retries
        that while the API server cannot be reached, instead of failing the start)."""
        self._start_loop()

    def stop(self, grace_seconds: float = 120.0) -> None:
        """Stop following and claiming. The Jobs keep running in the cluster (their logs are copied once more); the
        next server with this worker id re-attaches to them. ``grace_seconds`` is unused (nothing to wait for)."""
        self._stop_loop()
        for run in list(self.running.values()):
            try:
                self._sync_log(run)
            except Exception as exc:  # best effort on the way out
                print(f"k8s runner: {type(exc).__name__}: {exc}", file=sys.stderr)

    def recover(self) -> list[str]:
        """Re-attach to the Jobs of this worker's running jobs; requeue (to resume) those whose Job is gone.
        Returns the requeued ids; the re-attached ones are in :attr:`reattached`."""
        requeued = []
        for job in self.store.running_jobs(self.worker):
            if job["id"] in self.running:
                continue
            name = job_name(job["id"])
            if self._read_job(name) is None:
                if self.store.requeue(job["id"], self.worker):
                    self._append_log(job["id"], f"[service] the server restarted and the Kubernetes Job {name} is "
                                     "gone; requeued to resume from the latest checkpoint")
                    requeued.append(job["id"])
            else:
                self.running[job["id"]] = _Tracked(job["id"], name)
                self.reattached.append(job["id"])
        self._recovered = True
        return requeued

    # --- the loop -----------------------------------------------------------------------------------------------
    def tick(self) -> None:
        """One round: follow the Jobs, forward cancels, submit queued jobs while fewer than ``slots`` run."""
        if not self._recovered:
            self.recover()
        self._follow()
        for job_id in self.store.cancel_requested(self.worker):
            run = self.running.get(job_id)
            if run is not None and not run.deleting:
                self._cancel(run)
        while not self._stop.is_set() and len(self.running) < self.slots:
            image = self._trainer_image()  # before claiming: a failure here leaves the queue as it is
            job = self.store.claim_next(self.worker)
            if job is None or not self._submit(job, image):
                return

    # --- submitting ---------------------------------------------------------------------------------------------
    def manifest(self, job_id: str, image: str | None = None) -> dict[str, Any]:
        """The Job this runner submits for ``job_id``."""
        return render_job(self.template, job_id, home=self.home, image=image or self.image or "lora-scripts:latest",
                          namespace=self.namespace, claim=self.claim, data_path=self.data_path, worker=self.worker)

    def _submit(self, job: dict[str, Any], image: str) -> bool:
        """Create the Job of a claimed job; False when the claim loop should pause until the next round."""
        from kubernetes.client import V1Job
        from kubernetes.client.exceptions import ApiException

        job_id, name = job["id"], job_name(job["id"])
        manifest = self.manifest(job_id, image)
        folder = job_dir(self.home, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LOG_STATE).unlink(missing_ok=True)  # a new attempt has new pods
        self._append_log(job_id, f"[service] attempt {job['attempts']} on {self.worker}: Kubernetes Job "
                         f"{self.namespace}/{name}: lora-scripts {' '.join(_container(manifest)['args'])}")
        try:
            self.batch.create_namespaced_job(self.namespace, V1Job.from_dict(manifest), _preload_content=False,
                                             _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 409:  # a Job of that name exists: ours, still running (adopt it), or a finished leftover
                existing = self._read_job(name)
                labels = ((existing or {}).get("metadata") or {}).get("labels") or {}
                if existing and _condition(existing) is None and not existing["metadata"].get("deletionTimestamp") \
                        and labels.get(JOB_ID_LABEL) == job_label(job_id):
                    self.running[job_id] = _Tracked(job_id, name)
                    return True
                if existing and not existing["metadata"].get("deletionTimestamp"):
                    self._delete(name, "Foreground")
                self.store.requeue(job_id, self.worker)
                self._append_log(job_id, f"[service] an older Kubernetes Job {name} is being deleted; retrying")
                return False
            if exc.status in (400, 403, 404, 422):  # the request itself is wrong (template, RBAC): say why
                self.store.finish(job_id, self.worker, "failed", None,
                                  f"could not create the Kubernetes Job {name}: {_api_message(exc)}")
                return True
            self.store.requeue(job_id, self.worker)  # 429, 5xx: the API server is busy; try again later
            raise
        except Exception:
            self.store.requeue(job_id, self.worker)  # unreachable API server: back in the queue, retried later
            raise
        self.running[job_id] = _Tracked(job_id, name)
        self.started_jobs += 1
        return True

    def _trainer_image(self) -> str:
        """--k8s-image, else the image of the service's own container (read once from its pod)."""
        if not self.image:
            pod = self._get_json(self.core.read_namespaced_pod, os.environ["POD_NAME"], self.namespace)
            containers = pod["spec"]["containers"]
            own = next((c for c in containers if c["name"] == SERVICE_CONTAINER), containers[0])
            self.image = own["image"]
        return self.image

    # --- following ----------------------------------------------------------------------------------------------
    def _follow(self) -> None:
        for run in list(self.running.values()):
            k8s_job = self._read_job(run.name)
            if k8s_job is None:  # gone: our cancel finished, or someone deleted it
                del self.running[run.job_id]
                if run.deleting:
                    self._finish(run.job_id, "cancelled", None, None)
                elif self.store.requeue(run.job_id, self.worker):
                    self._append_log(run.job_id, f"[service] the Kubernetes Job {run.name} disappeared; requeued to "
                                     "resume from the latest checkpoint")
                continue
            done = _condition(k8s_job)
            if done is not None or time.monotonic() - run.last_sync >= self.log_sync_seconds:
                self._sync_log(run)
            if done is None or run.deleting:
                continue  # still running, or waiting for our Foreground delete to finish
            if done["type"] == "Complete":
                state, code, error = "succeeded", 0, None
            else:
                state = "failed"
                code, error = self._failure(run, done)
            self._delete(run.name, "Background")  # its pods have ended; the result and the log are ours now
            del self.running[run.job_id]
            self._finish(run.job_id, state, code, error)

    def _failure(self, run: _Tracked, condition: dict[str, Any]) -> tuple[int | None, str]:
        """Exit code and message of a failed Job: the trainer's ``error:`` line if it printed one."""
        code, message = None, None
        for pod in reversed(self._pods(run)):  # newest first
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                if status.get("name") != CONTAINER:
                    continue
                state = status.get("state") or {}
                term = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
                if term:
                    code, message = term.get("exitCode"), term.get("message")
            if code is not None:
                break
        error = _error_line(message) or _error_line(self._log_tail(run.job_id))
        if error:
            return code, error
        why = f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}".rstrip(": ")
        if code is not None:
            return code, f"the trainer exited with code {code} (Kubernetes: {why}); see the log"
        return code, f"the Kubernetes Job failed ({why}); see the log"

    def _cancel(self, run: _Tracked) -> None:
        self._sync_log(run)
        self._append_log(run.job_id, f"[service] cancel requested: deleting Kubernetes Job {run.name} (its pod gets "
                         "SIGTERM and writes a checkpoint)")
        self._delete(run.name, "Foreground")
        run.deleting = True

    def _finish(self, job_id: str, state: str, code: int | None, error: str | None) -> None:
        if self.store.finish(job_id, self.worker, state, code, error) and self.on_finish is not None:
            try:
                self.on_finish(self.store.get_job(job_id))
            except Exception as exc:  # e.g. the S3 mirror is down: the job itself is done
                self._append_log(job_id, f"[service] after-job hook failed: {type(exc).__name__}: {exc}")

    # --- logs ---------------------------------------------------------------------------------------------------
    def _sync_log(self, run: _Tracked) -> None:
        """Append what the Job's pods logged since the last copy to train.log (each pod under a header line)."""
        from kubernetes.client.exceptions import ApiException

        run.last_sync = time.monotonic()
        folder = job_dir(self.home, run.job_id)
        state_file = folder / LOG_STATE
        try:
            copied: dict[str, int] = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            copied = {}
        for pod in self._pods(run):
            pod_name, status = pod["metadata"]["name"], pod.get("status") or {}
            if status.get("phase") == "Pending":
                note = _pending_reason(pod)
                if note and note != run.note:
                    run.note = note
                    self._append_log(run.job_id, f"[service] pod {pod_name} waits: {note}")
                continue
            try:
                data = self.core.read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER, _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT).data
            except ApiException:
                continue  # the container has not started, or the pod is already gone
            done = copied.get(pod_name)
            chunks = []
            if done is None:
                node = (pod.get("spec") or {}).get("nodeName") or "?"
                chunks.append(f"[service] pod {pod_name} on node {node}:\n".encode())
                done = 0
            elif len(data) < done:  # the kubelet rotated the log file: what remains is all we can get
                chunks.append(b"\n[service] (the pod log was rotated: some lines are missing or repeated)\n")
                done = 0
            chunks.append(data[done:])
            copied[pod_name] = len(data)
            with open(folder / "train.log", "ab") as fh:
                fh.write(b"".join(chunks))
        if copied:
            state_file.write_text(json.dumps(copied), encoding="utf-8")

    def _append_log(self, job_id: str, line: str) -> None:
        folder = job_dir(self.home, job_id)
        if folder.is_dir():
            with open(folder / "train.log", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def _log_tail(self, job_id: str) -> str:
        try:
            with open(job_dir(self.home, job_id) / "train.log", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    # --- API helpers --------------------------------------------------------------------------------------------
    def _get_json(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a read method and return the raw JSON (dicts: no client model version skew on reads)."""
        response = method(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        return json.loads(response.data)

    def _read_job(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._get_json(self.batch.read_namespaced_job, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _pods(self, run: _Tracked) -> list[dict[str, Any]]:
        """The Job's pods, oldest first."""
        pods = self._get_json(self.core.list_namespaced_pod, self.namespace,
                              label_selector=f"{JOB_ID_LABEL}={job_label(run.job_id)}")["items"]
        return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def _delete(self, name: str, propagation: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy=propagation,
                                             _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status != 404:
                raise


def _pending_reason(pod: dict[str, Any]) -> str | None:
    """Why a pending pod does not run yet (unschedulable, image pull), if the status says."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("message"):
            return f"{cond.get('reason', 'Unschedulable')}: {cond['message']}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None


def _api_message(exc: Any) -> str:
    try:
        return f"{exc.status} {json.loads(exc.body)['message']}"
    except (TypeError, ValueError, KeyError):
        return f"{exc.status} {exc.reason}"


def _own_namespace() -> str | None:
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None
