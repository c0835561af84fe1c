"""Prometheus metrics, computed at scrape time from the store and the running jobs' ``logs/loss.csv``, plus this
process's HTTP requests (count and latency per route, what a canary analysis compares between versions).

Reading the database on each scrape keeps the job numbers true for every server sharing it (a counter in one process
would miss the jobs another server ran). The HTTP metrics are per process on purpose: they describe this server.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Mount

from .store import STATES, JobStore


def last_loss_rows(loss_csv: Path, n: int = 2) -> list[dict[str, str]]:
    """The last ``n`` rows of a ``loss.csv`` (empty if absent)."""
    try:
        with open(loss_csv, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return []
    return rows[-n:]


def read_loss_csv(loss_csv: Path) -> list[dict[str, float]]:
    """Every row of a ``loss.csv`` as numbers (step, loss, lr, elapsed_s)."""
    out = []
    try:
        with open(loss_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                try:
                    out.append({k: float(row[k]) for k in ("step", "loss", "lr", "elapsed_s")})
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        pass
    return out


def gpu_memory() -> list[tuple[str, float, float]]:
    """(gpu index, used bytes, total bytes) per NVIDIA GPU, from ``nvidia-smi``; empty without one."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            rows.append((parts[0], float(parts[1]) * 2**20, float(parts[2]) * 2**20))
    return rows


class ServiceCollector(Collector):
    """Jobs by state, queue length, per running job: step, loss and seconds per step; GPU memory."""

    def __init__(self, store: JobStore, output_dir_of: callable) -> None:
        self.store = store
        self.output_dir_of = output_dir_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.count_by_state()
        by_state = GaugeMetricFamily("lora_jobs", "Jobs in the store by state", labels=["state"])
        for state in STATES:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("lora_queue_length", "Jobs waiting to run", value=counts.get("queued", 0))
        yield GaugeMetricFamily("lora_jobs_failed", "Jobs that ended in failure (all time)", value=counts.get("failed", 0))
        step = GaugeMetricFamily("lora_job_step", "Last logged optimizer step of a running job", labels=["job"])
        loss = GaugeMetricFamily("lora_job_loss", "Last logged training loss of a running job", labels=["job"])
        step_time = GaugeMetricFamily("lora_job_step_seconds", "Seconds per step between the last two logged steps",
                                      labels=["job"])
        for job in self.store.list_jobs(state="running"):
            out = self.output_dir_of(job["id"])
            rows = last_loss_rows(out / "logs" / "loss.csv") if out is not None else []
            try:
                numbers = [(float(r["step"]), float(r["loss"]), float(r["elapsed_s"])) for r in rows]
            except (KeyError, TypeError, ValueError):
                continue
            if numbers:
                step.add_metric([job["id"]], numbers[-1][0])
                loss.add_metric([job["id"]], numbers[-1][1])
            if len(numbers) == 2 and numbers[1][0] > numbers[0][0]:
                step_time.add_metric([job["id"]], (numbers[1][2] - numbers[0][2]) / (numbers[1][0] - numbers[0][0]))
        yield step
        yield loss
        yield step_time
        gpus = gpu_memory()
        if gpus:
            used = GaugeMetricFamily("lora_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            total = GaugeMetricFamily("lora_gpu_memory_total_bytes", "GPU memory size", labels=["gpu"])
            for index, u, t in gpus:
                used.add_metric([index], u)
                total.add_metric([index], t)
            yield used
            yield total


class HttpMetrics:
    """``lora_http_requests_total{method,route,status}``, ``lora_http_request_duration_seconds{method,route}`` and
    the process metrics (memory, CPU), in a registry of their own: one per app, as tests build many apps in a process
    and the global registry refuses a second metric of the same name. ``route`` is the matched route template
    (``/api/jobs/{job_id}``), never the raw path, so the number of series stays bounded."""

    # seconds; API calls take milliseconds, uploads and artifact downloads up to seconds
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lora_http_requests", "HTTP requests answered, by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram("lora_http_request_duration_seconds", "Time to answer an HTTP request (to the "
                                  "end of the response body)", ["method", "route"], buckets=self.BUCKETS,
                                  registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...


# the methods a client can send are unbounded text; only these become label values, every other one is "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """``method`` if it is a standard HTTP method, else ``other`` (keeps the number of series bounded)."""
    return method if method in HTTP_METHODS else "other"


def route_template(scope: dict[str, Any]) -> str:
    """The template of the route that answered (``/jobs/{job_id}``, ``/static/{path}``), else ``unmatched``."""
    route = scope.get("route")  # set on the request's scope by the router for FastAPI's own routes
    template = getattr(route, "path_format", None)
    if template:
        return template
    path = scope.get("path", "")
    for mount in getattr(scope.get("app"), "routes", ()):  # a mount (the console's /static) does not set it
        if isinstance(mount, Mount) and (path == mount.path or path.startswith(mount.path + "/")):
            return mount.path_format
    return "unmatched"


class HttpMetricsMiddleware:
    """ASGI middleware recording every HTTP request in :class:`HttpMetrics`. An exception that escapes the app counts
    as a 500 (the server's error handler answers it so)."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            method, route = method_label(scope["method"]), route_template(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.perf_counter() - start)


def render_metrics(store: JobStore, output_dir_of: callable, http: HttpMetrics | None = None) -> bytes:
    """The Prometheus text exposition of :class:`ServiceCollector` and, when given, the HTTP metrics."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(store, output_dir_of))
    return generate_latest(registry) + (generate_latest(http.registry) if http is not None else b"")
