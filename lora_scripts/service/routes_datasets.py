"""Dataset routes: create, upload images or a zip, auto-label, edit captions, run the data check."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from ..data.label import IMAGE_EXTENSIONS, read_existing_rows, write_metadata
from ..errors import UserError
from .app import ERROR_RESPONSES, Service, get_service, require_read, require_write
from .job_paths import inside_roots, resolve_under, too_long
from .security import UploadRefused, check_folder, check_type, extract_zip, read_limited, safe_filename, write_new_file

router = APIRouter(prefix="/api/datasets", tags=["datasets"], responses=ERROR_RESPONSES)


class DatasetIn(BaseModel):
    name: str = Field(..., min_length=1, max_length=200, description="A name to show in the console.")


class CaptionsIn(BaseModel):
    captions: dict[str, str] = Field(..., description="file name -> caption; other rows are kept")


class LabelIn(BaseModel):
    backend: Literal["filename", "sidecar", "caption", "tagger"] = Field(
        "filename", description="as `lora-scripts label --backend`")
    model: str | None = Field(None, max_length=500, description="caption/tagger: model folder (relative to the home)")
    trigger: str | None = Field(None, max_length=200, description="trigger word put first in every caption")
    overwrite: bool = Field(False, description="label every image again (default: only images without a caption)")


class CheckIn(BaseModel):
    resolution: int = Field(512, ge=8, description="the training resolution to check the image sizes against")


def _refused(exc: UploadRefused) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", exc.field], "msg": str(exc), "type": "upload_refused"}]},
                        status_code=exc.status)


def _dataset(svc: Service, dataset_id: str) -> Path:
    svc.dataset_or_404(dataset_id)
    folder = svc.dataset_dir(dataset_id)
    check_folder(folder, svc.home / "datasets")
    return folder


def describe(svc: Service, dataset_id: str) -> dict[str, Any]:
    """A dataset with its images and captions."""
    ds = svc.store.get_dataset(dataset_id)
    folder = svc.dataset_dir(dataset_id)
    try:
        captions = read_existing_rows(folder / "metadata.csv")
    except UserError:
        captions = {}
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) \
        if folder.is_dir() else []
    sidecars = {n: _sidecar(folder, n) for n in names if n not in captions}
    sidecars = {n: c for n, c in sidecars.items() if c}
    if not (folder / "metadata.csv").exists():
        captions = sidecars  # what the trainer reads then (caption_source auto falls back to the sidecars)
        sidecars = {}
    images = [{"name": n, "caption": captions.get(n), "url": f"/api/datasets/{dataset_id}/files/{n}"} for n in names]
    return {**ds, "path": str(folder), "images": images, "count": len(images),
            "captioned": sum(1 for i in images if i["caption"]),
            # images whose only caption is a sidecar while metadata.csv exists: training ignores it until merged
            "sidecar_only": len(sidecars)}


def _sidecar(folder: Path, image: str) -> str | None:
    """The caption in ``<stem>.txt`` or ``<stem>.caption`` beside an image, if any."""
    for suffix in (".txt", ".caption"):
        path = folder / (Path(image).stem + suffix)
        if path.is_file() and not path.is_symlink():
            try:
                return " ".join(path.read_text(encoding="utf-8").split())[:1000] or None
            except (OSError, UnicodeDecodeError):
                return None
    return None


@router.post("", status_code=201, dependencies=[Depends(require_write)])
def create_dataset(body: DatasetIn, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """Create an empty dataset."""
    dataset_id = uuid.uuid4().hex[:12]
    svc.dataset_dir(dataset_id).mkdir(parents=True)
    svc.store.create_dataset(dataset_id, body.name)
    return describe(svc, dataset_id)


@router.get("", dependencies=[Depends(require_read)])
def list_datasets(svc: Service = Depends(get_service)) -> list[dict[str, Any]]:
    """All datasets, newest first."""
    return [describe(svc, d["id"]) for d in svc.store.list_datasets()]


@router.get("/{dataset_id}", dependencies=[Depends(require_read)])
def get_dataset(dataset_id: str, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """One dataset with its images and captions."""
    _dataset(svc, dataset_id)
    return describe(svc, dataset_id)


@router.post("/{dataset_id}/files", dependencies=[Depends(require_write)])
def upload(dataset_id: str, files: list[UploadFile] = File(...), svc: Service = Depends(get_service)) -> Any:
    """Upload images (png, jpg, webp, bmp), caption sidecars (.txt, .caption) or a .zip of them. Each file is
    size-limited and type-checked; a bad file refuses the whole request before anything is written."""
    try:
        folder = _dataset(svc, dataset_id)
        limits, staged, total = svc.settings.limits, [], 0
        for item in files:
            name = safe_filename(item.filename or "")
            is_zip = name.lower().endswith(".zip")
            data = read_limited(item.file, limits.max_total_bytes if is_zip else limits.max_file_bytes, name)
            total += len(data)
            if total > limits.max_total_bytes:
                raise UploadRefused(f"the upload is larger than the limit of {limits.max_total_bytes} bytes", 413)
            if not is_zip:
                check_type(name, data)
            staged.append((name, is_zip, data))
        written: list[Path] = []
        for name, is_zip, data in staged:
            written += extract_zip(data, folder, limits, name) if is_zip else [write_new_file(folder, name, data)]
    except UploadRefused as exc:
        return _refused(exc)
    return {"written": sorted(p.name for p in written), "dataset": describe(svc, dataset_id)}


@router.get("/{dataset_id}/files/{name}", dependencies=[Depends(require_read)],
            responses={200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}},
                                         "text/plain": {"schema": {"type": "string"}}},
                             "description": "The file"}})
def get_file(dataset_id: str, name: str, svc: Service = Depends(get_service)) -> FileResponse:
    """One file of the dataset (thumbnails in the console)."""
    folder = _dataset(svc, dataset_id)
    try:
        path = folder / safe_filename(name)
    except UploadRefused as exc:
        raise HTTPException(404, str(exc)) from None
    if not path.is_file() or path.is_symlink():
        raise HTTPException(404, f"no file {name!r} in dataset {dataset_id}")
    return FileResponse(path)


@router.put("/{dataset_id}/captions", dependencies=[Depends(require_write)])
def edit_captions(dataset_id: str, body: CaptionsIn, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """Set captions of some images (an empty caption removes the row); metadata.csv is rewritten atomically."""
    folder = _dataset(svc, dataset_id)
    errors = []
    for name in body.captions:
        if too_long(name) or Path(name).name != name or not (folder / name).is_file():
            errors.append({"loc": ["body", "captions", name], "msg": f"no image {name!r} in this dataset",
                           "type": "value_error"})
    if errors:
        raise HTTPException(422, errors)
    try:
        rows = read_existing_rows(folder / "metadata.csv")
    except UserError:
        rows = {}
    for name, caption in body.captions.items():
        caption = " ".join(caption.split())  # one line: metadata.csv rows are single-line captions
        if caption:
            rows[name] = caption
        else:
            rows.pop(name, None)
    write_metadata(folder / "metadata.csv", sorted(rows.items()))
    return describe(svc, dataset_id)


@router.post("/{dataset_id}/label", dependencies=[Depends(require_write)])
def auto_label(dataset_id: str, body: LabelIn, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """Run ``lora-scripts label`` on the dataset (a subprocess, arguments as a list: no shell)."""
    folder = _dataset(svc, dataset_id)
    argv = [sys.executable, "-m", "lora_scripts.cli", "label", f"--input={folder}", f"--backend={body.backend}"]
    if body.backend in ("caption", "tagger") and not body.model:
        # the labeller would otherwise try the hub for its default model, and fail only after a long wait
        raise HTTPException(422, [{"loc": ["body", "model"], "msg": f"the {body.backend} back-end needs a model "
                                   "folder: put one under <home>/models and give its path (e.g. models/blip)",
                                   "type": "missing"}])
    if body.model:
        model = None if too_long(body.model) else resolve_under(body.model, svc.home)
        if model is None or not inside_roots(model, [r.resolve() for r in svc.read_roots()]):
            raise HTTPException(422, [{"loc": ["body", "model"], "msg": f"{body.model[:100]!r} is not inside the "
                                       "home's models folder or a --model-root", "type": "path_refused"}])
        argv.append(f"--model={model}")
    if body.trigger:
        argv.append(f"--trigger={body.trigger}")  # KEY=VALUE form: a value starting with '-' stays a value
    if body.overwrite:
        argv.append("--overwrite")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")] or proc.stderr.splitlines()[-1:]
        raise HTTPException(422, [{"loc": ["body", "backend"], "msg": (lines[0] if lines else "labelling failed")
                                   .removeprefix("error: "), "type": "label_failed"}])
    return {"output": proc.stdout.strip().splitlines()[-1:], "dataset": describe(svc, dataset_id)}


@router.post("/{dataset_id}/check", dependencies=[Depends(require_write)])
def data_check(dataset_id: str, body: CheckIn, svc: Service = Depends(get_service)) -> dict[str, Any]:
    """The trainer's data check (``lora-scripts check``'s report): errors and warnings, all at once."""
    import json

    from ..data.check import check_images

    folder = _dataset(svc, dataset_id)
    report = check_images(folder, folder / "metadata.csv", body.resolution)
    return json.loads(report.to_json())
