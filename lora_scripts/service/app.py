"""The FastAPI app: REST API (OpenAPI docs at /docs), web console, health, readiness and Prometheus metrics.

Access: every API call needs the token (``Authorization: Bearer <token>``, or the console's cookie), reads too, on any
bind address: a local process or a web page must not read jobs, logs or outputs. Writes with the cookie also need
the console's ``X-Console`` header, which a cross-site form cannot send. Only ``/healthz``, ``/readyz``, the sign-in
page and the static files are open. Every request's ``Host`` must be this server's (:mod:`.guards`).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel

from ..errors import ConfigError
from .guards import AllowedHosts, HostCheckMiddleware
from .runner import Runner, job_dir
from .security import UploadLimits, load_or_create_token, token_matches
from .store import JobStore

CONSOLE_DIR = Path(__file__).parent / "console"
COOKIE = "lora_token"


class Problem(BaseModel):
    """An error: ``detail`` is one message, or a list of {loc, msg, type} (one per field)."""

    detail: Any


# the error answers every API route may give, documented in the OpenAPI (the fuzz test holds the server to them)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Host header not served here (DNS rebinding guard), or a bad request"},
    401: {"model": Problem, "description": "No token: send `Authorization: Bearer <token>`"},
    403: {"model": Problem, "description": "Wrong token"},
    404: {"model": Problem, "description": "No such job, dataset or file"},
    409: {"model": Problem, "description": "The job is not in a state that allows this"},
    413: {"model": Problem, "description": "The request body or an uploaded file is too large"},
    415: {"model": Problem, "description": "An uploaded file is not of an accepted type"},
    422: {"model": Problem, "description": "Invalid input; `detail` lists every problem with its field"},
    429: {"model": Problem, "description": "Too many log streams open with this token"},
    507: {"model": Problem, "description": "The server's disk is full"},
}


@dataclass
class ServiceSettings:
    """Everything ``lora-scripts serve`` can set."""

    home: Path
    db_url: str | None = None  # default: SQLite file <home>/service.db
    token: str | None = None  # default: LORA_SCRIPTS_TOKEN, else <home>/token (created on first start)
    host: str = "127.0.0.1"
    port: int = 7860
    slots: int | None = None  # parallel jobs; default one per GPU, one on CPU
    run_jobs: bool = True  # False: API only, no runner in this process
    train_command: list[str] | None = None  # test hook: the runner's argv template (see runner.DEFAULT_COMMAND)
    worker: str | None = None  # default host:port; must be stable across restarts for recovery
    limits: UploadLimits = field(default_factory=UploadLimits)
    poll_seconds: float = 0.5
    lease_seconds: float = 60.0  # a runner silent this long is presumed dead; others take over its jobs
    mirror_url: str | None = None  # e.g. s3://bucket/prefix: finished jobs' outputs are copied there
    mirror_options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options (endpoint_url, key...)
    form_defaults: dict[str, Any] = field(default_factory=dict)  # pre-filled job form (the demo sets it)
    runner: str = "local"  # local: subprocesses here; kubernetes: one batch/v1 Job per job (k8s_runner.py)
    k8s_options: dict[str, Any] = field(default_factory=dict)  # KubernetesRunner keywords (namespace, image...)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides localhost and the bind address
    model_roots: list[Path] = field(default_factory=list)  # folders jobs may read besides <home>/datasets and models
    max_streams: int = 8  # concurrent log streams (follow=true) per token
    allow_remote_code: bool = False  # accept jobs with trust_remote_code: true (a model folder's own Python code)

    def resolved(self) -> "ServiceSettings":
        """Fill in the defaults that depend on the environment and the home folder."""
        self.home = Path(self.home).expanduser().resolve()
        for sub in ("", "jobs", "datasets", "models"):
            try:
                (self.home / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(home_unwritable(self.home / sub, exc)) from None
        self.model_roots = [Path(p).expanduser().resolve() for p in self.model_roots]
        self.db_url = self.db_url or os.environ.get("LORA_SCRIPTS_DB") or f"sqlite:///{self.home / 'service.db'}"
        self.worker = self.worker or os.environ.get("LORA_SCRIPTS_WORKER_ID") or f"{socket.gethostname()}:{self.port}"
        return self


def home_unwritable(folder: Path, exc: OSError) -> str:
    """One line for a home the server cannot write (a volume owned by another user, a full disk)."""
    if exc.errno == errno.ENOSPC:
        return f"--home: cannot create {folder}: the disk is full; free space or choose another --home"
    return (f"--home: cannot create {folder} ({exc.strerror or exc}); the server runs as UID {os.getuid()}: let it "
            f"write there (e.g. chown -R {os.getuid()} {folder.parent}) or choose another --home")


class Service:
    """What the routes share: settings, store, runner, token."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings.resolved()
        self.home = self.settings.home
        self.store = JobStore(self.settings.db_url)
        self.store.migrate()
        self.token, self.token_created = load_or_create_token(
            self.home, self.settings.token or os.environ.get("LORA_SCRIPTS_TOKEN"))
        self.allowed_hosts = AllowedHosts(self.settings.host, self.settings.allowed_hosts)
        self.streams: dict[str, int] = {}  # token -> open log streams
        self._streams_lock = threading.Lock()
        self.mirror = None
        if self.settings.mirror_url:
            from .mirror import Mirror

            self.mirror = Mirror(self.settings.mirror_url, self.settings.mirror_options)
        self.runner: Any = None  # Runner or KubernetesRunner: start/stop/wake/alive/tick/recover
        if self.settings.run_jobs and self.settings.runner == "kubernetes":
            from .k8s_runner import KubernetesRunner  # the kubernetes client is imported only here

            self.runner = KubernetesRunner(
                self.store, self.home, self.settings.worker, slots=self.settings.slots,
                poll_seconds=self.settings.poll_seconds, on_finish=self._after_job, **self.settings.k8s_options)
        elif self.settings.run_jobs:
            self.runner = Runner(
                self.store, self.home, self.settings.worker, slots=self.settings.slots,
                command=self.settings.train_command, poll_seconds=self.settings.poll_seconds,
                on_finish=self._after_job, lease_seconds=self.settings.lease_seconds,
            )

    def _after_job(self, job: dict[str, Any]) -> None:
        if self.mirror is not None and job["state"] == "succeeded":
            self.mirror.upload_job(job["id"], self.output_dir(job["id"]))

    def read_roots(self) -> list[Path]:
        """Folders a job's input paths may lie in: the home's datasets and models, and ``--model-root`` folders."""
        return [self.home / "datasets", self.home / "models", *self.settings.model_roots]

    def open_stream(self, token: str) -> bool:
        """Count one more log stream of ``token``; False (nothing counted) when it already has ``max_streams``."""
        with self._streams_lock:
            if self.streams.get(token, 0) >= self.settings.max_streams:
                return False
            self.streams[token] = self.streams.get(token, 0) + 1
            return True

    def close_stream(self, token: str) -> None:
        """A log stream of ``token`` ended."""
        with self._streams_lock:
            self.streams[token] = max(0, self.streams.get(token, 0) - 1)

    def job_or_404(self, job_id: str) -> dict[str, Any]:
        """The job, or an HTTP 404 for the API and the console pages alike."""
        job = self.store.get_job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def dataset_or_404(self, dataset_id: str) -> dict[str, Any]:
        """The dataset's record, or an HTTP 404."""
        dataset = self.store.get_dataset(dataset_id)
        if dataset is None:
            raise HTTPException(404, f"no dataset {dataset_id!r}")
        return dataset

    def dataset_dir(self, dataset_id: str) -> Path:
        """The folder of a dataset: its images, sidecars and metadata.csv."""
        return self.home / "datasets" / dataset_id

    def output_dir(self, job_id: str) -> Path | None:
        """The output_dir a job's config names (None before it has one)."""
        import yaml

        try:
            data = yaml.safe_load((job_dir(self.home, job_id) / "config.yaml").read_text(encoding="utf-8"))
            return Path(data["output_dir"])
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            return None


def _given_token(request: Request, for_write: bool) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    cookie = request.cookies.get(COOKIE)
    # the cookie alone would let another site's form post here (CSRF): writes also need a header only our JS sets
    if cookie and (not for_write or request.headers.get("x-console") == "1"):
        return cookie
    return None


def _check(request: Request, for_write: bool) -> str:
    svc: Service = request.app.state.service
    given = _given_token(request, for_write)
    if given is None:
        raise HTTPException(401, "a token is required: send 'Authorization: Bearer <token>' (printed when the "
                            "server started, saved in <home>/token)", headers={"WWW-Authenticate": "Bearer"})
    if not token_matches(svc.token, given):
        raise HTTPException(403, "the token is wrong")
    return given


def require_write(request: Request) -> str:
    """Dependency: the token (a cookie only with the console's header); returns it."""
    return _check(request, for_write=True)


def require_read(request: Request) -> str:
    """Dependency: the token (header or the console's cookie), on every bind address; returns it."""
    return _check(request, for_write=False)


def get_service(request: Request) -> Service:
    """Dependency: the shared :class:`Service`."""
    return request.app.state.service


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the app; its lifespan starts and stops the runner."""
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.runner is not None:
            service.runner.start()
        try:
            yield
        finally:
            if service.runner is not None:
                service.runner.stop()
            service.store.dispose()

    # the largest upload (all files, multipart overhead included) bounds every body; FastAPI refuses a larger
    # Content-Length before reading and stops a body that streams past it, before anything is spooled to disk
    max_body = service.settings.limits.max_total_bytes + 2**20
    app = FastAPI(title="lora-scripts service", version=_version(), lifespan=lifespan, max_body_size=max_body,
                  description="Submit LoRA training jobs, watch them, download the results. Every /api call and "
                  "/metrics needs the token: `Authorization: Bearer <token>`.")
    app.state.service = service
    from .metrics import HttpMetrics, HttpMetricsMiddleware

    app.state.http_metrics = HttpMetrics()
    app.add_middleware(HostCheckMiddleware, allowed=service.allowed_hosts)
    # outermost, so refused hosts and oversize bodies are counted too
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.http_metrics)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        # what a client's input can make the file system refuse; anything else stays a bug (a 500 with a traceback)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return JSONResponse({"detail": "the server's disk is full; try again after space is freed"},
                                status_code=507)
        if exc.errno == errno.ENAMETOOLONG:
            return JSONResponse({"detail": [{"loc": ["body"], "msg": "a name or path in the request is too long for "
                                             "the file system", "type": "name_too_long"}]}, status_code=422)
        raise exc

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    from .routes_datasets import router as datasets_router
    from .routes_jobs import router as jobs_router

    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.mount("/static", StaticFiles(directory=CONSOLE_DIR / "static"), name="static")
    templates = Jinja2Templates(directory=CONSOLE_DIR / "templates")

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, bool]:
        """The process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"])
    def readyz(svc: Service = Depends(get_service)) -> JSONResponse:
        """The database takes writes, the home is writable and the runner (if this server runs jobs) is alive."""
        problems = []
        try:
            svc.store.check_writable()
        except Exception as exc:  # any driver error means not ready
            problems.append(f"database: {type(exc).__name__}")
        try:
            probe_home(svc.home)
        except OSError as exc:
            problems.append(f"home: {exc.strerror or type(exc).__name__}")
        if svc.runner is not None and not svc.runner.alive:
            problems.append("runner: not running")
        if getattr(svc.runner, "store_error", None):
            problems.append(f"runner: {svc.runner.store_error}")
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=503 if problems else 200)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_read)],
             responses={**ERROR_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                 "description": "Prometheus text exposition"}})
    def metrics(request: Request, svc: Service = Depends(get_service)) -> Response:
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from .metrics import render_metrics

        return Response(render_metrics(svc.store, svc.output_dir, request.app.state.http_metrics),
                        media_type=CONTENT_TYPE_LATEST)

    # --- console ------------------------------------------------------------------------------------------------
    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        svc: Service = request.app.state.service
        if not token_matches(svc.token, _given_token(request, for_write=False)):
            return templates.TemplateResponse(request, "login.html", {"error": None}, status_code=401)
        return templates.TemplateResponse(request, name, {"logged_in": True, **context})

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"error": None})

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: str = Form("")) -> Response:
        # a POSTed form: the token never lands in a URL, the browser history or an access log
        if not token_matches(request.app.state.service.token, token):
            return templates.TemplateResponse(request, "login.html", {"error": "That token is wrong."}, status_code=403)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> HTMLResponse:
        return page(request, "index.html")

    @app.get("/datasets/{dataset_id}", response_class=HTMLResponse, include_in_schema=False)
    def dataset_page(request: Request, dataset_id: str) -> HTMLResponse:
        return page(request, "dataset.html", dataset=request.app.state.service.dataset_or_404(dataset_id))

    @app.get("/jobs/new", response_class=HTMLResponse, include_in_schema=False)
    def new_job_page(request: Request, dataset: str | None = None) -> HTMLResponse:
        svc: Service = request.app.state.service
        # the dataset asked for, else the one the pre-filled form is about (the demo's), else none: never silently
        # the newest, which may not be the one the form's other fields were written for
        selected = dataset or svc.settings.form_defaults.get("dataset_id")
        return page(request, "job_new.html", datasets=svc.store.list_datasets(), selected=selected,
                    defaults=svc.settings.form_defaults)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        return page(request, "job.html", job=request.app.state.service.job_or_404(job_id))

    return app


def probe_home(home: Path) -> None:
    """Write, fsync and remove a small file in the home; raises OSError when the home is read-only or full."""
    probe = home / f".ready-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        probe.unlink(missing_ok=True)


def _version() -> str:
    from .. import __version__

    return __version__
