"""The FastAPI app: REST API (OpenAPI docs at /docs), web console, health, readiness and Prometheus metrics.

Access: every write needs the token (``Authorization: Bearer <token>``, or the console's cookie together with its
``X-Console`` header, which a cross-site form cannot send); reads need it too when the server listens on a
non-loopback address.
"""

from __future__ import annotations

import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from .runner import Runner, job_dir
from .security import UploadLimits, is_loopback, load_or_create_token, token_matches
from .store import JobStore

CONSOLE_DIR = Path(__file__).parent / "console"
COOKIE = "lora_token"


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

    def resolved(self) -> "ServiceSettings":
        """Fill in the defaults that depend on the environment and the home folder."""
        self.home = Path(self.home).expanduser().resolve()
        for sub in ("", "jobs", "datasets", "models"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self.db_url = self.db_url or os.environ.get("LORA_SCRIPTS_DB") or f"sqlite:///{self.home / 'service.db'}"
        self.worker = self.worker or os.environ.get("LORA_SCRIPTS_WORKER_ID") or f"{socket.gethostname()}:{self.port}"
        return self


class Service:
    """What the routes share: settings, store, runner, token."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings.resolved()
        self.home = self.settings.home
        self.store = JobStore(self.settings.db_url)
        self.store.migrate()
        self.token, self.token_created = load_or_create_token(
            self.home, self.settings.token or os.environ.get("LORA_SCRIPTS_TOKEN"))
        self.reads_need_token = not is_loopback(self.settings.host)
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


def _check(request: Request, for_write: bool) -> None:
    svc: Service = request.app.state.service
    given = _given_token(request, for_write)
    if given is None:
        raise HTTPException(401, "a token is required: send 'Authorization: Bearer <token>' (printed when the "
                            "server started, saved in <home>/token)", headers={"WWW-Authenticate": "Bearer"})
    if not token_matches(svc.token, given):
        raise HTTPException(403, "the token is wrong")


def require_write(request: Request) -> None:
    """Dependency: the token, always."""
    _check(request, for_write=True)


def require_read(request: Request) -> None:
    """Dependency: the token when the server listens on a non-loopback address."""
    if request.app.state.service.reads_need_token:
        _check(request, for_write=False)


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

    app = FastAPI(title="lora-scripts service", version=_version(), lifespan=lifespan,
                  description="Submit LoRA training jobs, watch them, download the results.")
    app.state.service = service
    from .metrics import HttpMetrics, HttpMetricsMiddleware

    app.state.http_metrics = HttpMetrics()
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.http_metrics)  # request count and latency per route

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
        """The database answers and the runner (if this server runs jobs) is alive."""
        problems = []
        try:
            svc.store.ping()
        except Exception as exc:  # any driver error means not ready
            problems.append(f"database: {type(exc).__name__}")
        if svc.runner is not None and not svc.runner.alive:
            problems.append("runner: not running")
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=503 if problems else 200)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_read)])
    def metrics(request: Request, svc: Service = Depends(get_service)) -> Response:
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from .metrics import render_metrics

        return Response(render_metrics(svc.store, svc.output_dir, request.app.state.http_metrics),
                        media_type=CONTENT_TYPE_LATEST)

    # --- console ------------------------------------------------------------------------------------------------
    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        svc: Service = request.app.state.service
        if svc.reads_need_token and not token_matches(svc.token, request.cookies.get(COOKIE)):
            return templates.TemplateResponse(request, "login.html", {"error": None}, status_code=401)
        signed_in = token_matches(svc.token, request.cookies.get(COOKIE))
        return templates.TemplateResponse(request, name, {"logged_in": signed_in, **context})

    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, token: str | None = None) -> Response:
        if token is None:
            return templates.TemplateResponse(request, "login.html", {"error": None})
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
        return page(request, "job_new.html", datasets=svc.store.list_datasets(), selected=dataset,
                    defaults=svc.settings.form_defaults)

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: str) -> HTMLResponse:
        return page(request, "job.html", job=request.app.state.service.job_or_404(job_id))

    return app


def _version() -> str:
    from .. import __version__

    return __version__
