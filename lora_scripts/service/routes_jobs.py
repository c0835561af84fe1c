"""Job routes: validate, create (form fields and/or YAML), list, get, cancel, resume, log, loss, artifacts."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import yaml
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from .app import ERROR_RESPONSES, Service, get_service, require_read, require_write
from .jobs import REMOTE_CODE_REFUSED, JobConfigError, build_job_config, dump_job_config
from .metrics import read_loss_csv
from .runner import job_dir
from .security import is_inside
from .store import FINAL_STATES

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
FOLLOW_POLL_SECONDS = 0.5


class JobIn(BaseModel):
    name: str | None = Field(None, max_length=200, description="A name to show in the console.")
    dataset_id: str | None = Field(None, description="Train on this dataset (sets train_data_dir and metadata_path).")
    config_yaml: str | None = Field(None, max_length=200_000, description="A lora-scripts YAML config.")
    config: dict[str, Any] | None = Field(None, description="Config keys (the form); applied on top of config_yaml.")


def _validate(svc: Service, body: JobIn, job_id: str):
    dataset_dir = None
    if body.dataset_id:
        if svc.store.get_dataset(body.dataset_id) is None:
            raise JobConfigError([{"loc": ["dataset_id"], "msg": f"no dataset {body.dataset_id!r}",
                                   "type": "value_error"}])
        dataset_dir = svc.dataset_dir(body.dataset_id)
    if not body.config_yaml and not body.config:
        raise JobConfigError([{"loc": ["config"], "msg": "give config (form fields) or config_yaml",
                               "type": "missing"}])
    return build_job_config(svc.home, job_dir(svc.home, job_id), body.config_yaml, body.config, dataset_dir,
                            job_name=body.name, read_roots=svc.read_roots(),
                            allow_remote_code=svc.settings.allow_remote_code)


def _config_errors(exc: JobConfigError) -> JSONResponse:
    return JSONResponse({"detail": [{**e, "loc": ["body", *e["loc"]]} for e in exc.errors]}, status_code=422)


def _total_steps(config_yaml: str) -> int | None:
    try:
        return yaml.safe_load(config_yaml).get("max_train_steps")
    except (yaml.YAMLError, AttributeError):
        return None


def describe(svc: Service, job: dict[str, Any]) -> dict[str, Any]:
    """A job with its progress (last logged step and loss), samples and downloadable files."""
    out = svc.output_dir(job["id"])
    rows = read_loss_csv(out / "logs" / "loss.csv") if out else []
    info = {k: v for k, v in job.items() if k != "config_yaml"}
    info["total_steps"] = _total_steps(job["config_yaml"]) if "config_yaml" in job else None
    info["step"] = int(rows[-1]["step"]) if rows else 0
    info["loss"] = rows[-1]["loss"] if rows else None
    if len(rows) >= 2 and rows[-1]["step"] > rows[-2]["step"]:
        info["seconds_per_step"] = (rows[-1]["elapsed_s"] - rows[-2]["elapsed_s"]) / (rows[-1]["step"] - rows[-2]["step"])
    info["artifacts"] = _artifacts(out) if out else []
    info["samples"] = [a for a in info["artifacts"] if a["path"].startswith("samples/") and a["path"].endswith(".png")]
    return info


def _artifacts(out: Path) -> list[dict[str, Any]]:
    """Files worth downloading: the LoRA files, adapter, logs, samples, summary (not the resumable checkpoints)."""
    if not out.is_dir():
        return []
    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not path.is_symlink() and not rel.startswith(("checkpoints/", "cache/")) \
                and "events.out.tfevents" not in rel:
            found.append({"path": rel, "size": path.stat().st_size})
    return found


@router.post("/validate", dependencies=[Depends(require_write)])
def validate_job(body: JobIn, svc: Service = Depends(get_service)) -> Any:
    """Validate a submission without queueing it: 200 with the resolved config, or 422 with every error per field."""
    try:
        cfg = _validate(svc, body, "validate")
    except JobConfigError as exc:
        return _config_errors(exc)
    return {"ok": True, "config": cfg.to_yaml_dict()}


@router.post("", status_code=201, dependencies=[Depends(require_write)])
def create_job(body: JobIn, svc: Service = Depends(get_service)) -> Any:
    """Queue a training job. The config is validated by the trainer's schema; errors come back per field (422)."""
    job_id = uuid.uuid4().hex[:12]
    try:
        cfg = _validate(svc, body, job_id)
    except JobConfigError as exc:
        return _config_errors(exc)
    folder = job_dir(svc.home, job_id)
    try:
        text = dump_job_config(cfg, folder / "config.yaml")
        job = svc.store.create_job(job_id, body.name or cfg.output_name or job_id, text, body.dataset_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if svc.runner is not None:
        svc.runner.wake()
    return describe(svc, job)


@router.get("", dependencies=[Depends(require_read)])
def list_jobs(state: str | None = None, limit: int = 200, svc: Service = Depends(get_service)) -> list[dict[str, Any]]:
    """Jobs, newest first; ``state`` filters (queued, running, succeeded, failed, cancelled)."""
    return svc.store.list_jobs(state=state, limit=min(max(limit, 1), 10_000))


@router.get("/{job_id}", dependencies=[Depends(require_read)])
def get_job(job_id: str, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """One job with its progress, samples and files."""
    return describe(svc, svc.job_or_404(job_id))


@router.get("/{job_id}/config", dependencies=[Depends(require_read)],
            responses={200: {"content": {"text/yaml": {"schema": {"type": "string"}}}, "description": "YAML"}})
def get_config(job_id: str, svc: Service = Depends(get_service)) -> PlainTextResponse:
    """The resolved YAML config the trainer runs with."""
    return PlainTextResponse(svc.job_or_404(job_id)["config_yaml"], media_type="text/yaml")


@router.post("/{job_id}/cancel", dependencies=[Depends(require_write)])
def cancel_job(job_id: str, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """Cancel: a queued job at once; a running one gets SIGTERM, writes a checkpoint and stops (resumable)."""
    svc.job_or_404(job_id)
    return describe(svc, svc.store.request_cancel(job_id))


@router.post("/{job_id}/resume", dependencies=[Depends(require_write)])
def resume_job(job_id: str, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """Queue a cancelled or failed job again; it continues from its latest checkpoint."""
    job = svc.job_or_404(job_id)
    if not svc.settings.allow_remote_code and (yaml.safe_load(job["config_yaml"]) or {}).get("trust_remote_code"):
        raise HTTPException(422, REMOTE_CODE_REFUSED)  # queued while allowed; the server now runs without the flag
    if not svc.store.resume(job_id):
        raise HTTPException(409, f"job {job_id} is {job['state']}; only cancelled or failed jobs can be resumed")
    if svc.runner is not None:
        svc.runner.wake()
    return describe(svc, svc.job_or_404(job_id))


@router.get("/{job_id}/loss", dependencies=[Depends(require_read)])
def get_loss(job_id: str, svc: Service = Depends(get_service)) -> list[dict[str, float]]:
    """The job's loss.csv rows (step, loss, lr, elapsed_s)."""
    svc.job_or_404(job_id)
    out = svc.output_dir(job_id)
    return read_loss_csv(out / "logs" / "loss.csv") if out else []


def _read_from(path: Path, position: int, size: int = 1_000_000) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(position)
            return fh.read(size)
    except FileNotFoundError:
        return b""


class _CountedStream(StreamingResponse):
    """A log stream that gives its place back when it ends, however it ends (done, client gone, server stopping),
    even if its body never started."""

    def __init__(self, content: AsyncIterator[bytes], release: Any) -> None:
        super().__init__(content, media_type="text/plain; charset=utf-8")
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get("/{job_id}/log", responses={200: {"description": "JSON {text, offset}; with follow=true a text stream",
                                               "content": {"application/json": {"schema": {"type": "object"}},
                                                           "text/plain": {"schema": {"type": "string"}}}}})
async def get_log(job_id: str, offset: int = Query(0, ge=0), follow: bool = False,
                  token: str = Depends(require_read), svc: Service = Depends(get_service)) -> Any:
    """The trainer's log from byte ``offset``: JSON {text, offset} to poll, or with ``follow=true`` a plain-text
    stream that ends when the job does (at most a few per token at once: 429 beyond)."""
    await run_in_threadpool(svc.job_or_404, job_id)
    path = job_dir(svc.home, job_id) / "train.log"
    if not follow:
        data = await run_in_threadpool(_read_from, path, offset)
        return {"text": data.decode("utf-8", errors="replace"), "offset": offset + len(data)}
    if not svc.open_stream(token):
        raise HTTPException(429, f"at most {svc.settings.max_streams} log streams per token at once; close one or "
                            "poll without follow=true", headers={"Retry-After": "5"})

    async def stream() -> AsyncIterator[bytes]:
        # an async generator: between polls it awaits a sleep, so a follower holds no worker thread (the file and
        # the store are read in the thread pool, a few milliseconds each) and server shutdown can cancel it
        position = offset
        while True:
            chunk = await run_in_threadpool(_read_from, path, position)
            position += len(chunk)
            if chunk:
                yield chunk
                continue
            job = await run_in_threadpool(svc.store.get_job, job_id)
            if job is None or job["state"] in FINAL_STATES:
                rest = await run_in_threadpool(_read_from, path, position)  # written just before it ended
                if rest:
                    yield rest
                return
            await anyio.sleep(FOLLOW_POLL_SECONDS)

    return _CountedStream(stream(), lambda: svc.close_stream(token))


@router.get("/{job_id}/artifacts", dependencies=[Depends(require_read)])
def list_artifacts(job_id: str, svc: Service = Depends(get_service)) -> list[dict[str, Any]]:
    """Downloadable files of the job's output folder."""
    svc.job_or_404(job_id)
    out = svc.output_dir(job_id)
    return _artifacts(out) if out else []


@router.get("/{job_id}/artifacts/{path:path}", dependencies=[Depends(require_read)],
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}},
                             "description": "The file"}})
def download(job_id: str, path: str, svc: Service = Depends(get_service)) -> FileResponse:
    """Download one file of the job's output folder."""
    svc.job_or_404(job_id)
    out = svc.output_dir(job_id)
    target = (out / path) if out else None
    if target is None or not is_inside(target, out) or not target.is_file() or target.is_symlink():
        raise HTTPException(404, f"no file {path!r} in job {job_id}'s output")
    return FileResponse(target, filename=target.name)
