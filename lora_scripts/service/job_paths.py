"""What a submitted job may touch on the server's disk.

- ``output_dir`` is the service's: always ``<home>/jobs/<id>/output``, one folder per job, so no job can resume or
  overwrite another's outputs. ``cache_dir`` may only be inside the job's folder or the shared ``<home>/cache``.
- Every other key that names a file or folder must resolve (symlinks followed) inside ``<home>/datasets``,
  ``<home>/models`` or an operator's ``--model-root``. A relative path is relative to the home.

The path keys are found from the trainer's schema, not listed here: a field typed ``Path`` (or a list of them), a
field marked ``json_schema_extra={"path": True}``, or one named ``*_path`` / ``*_dir`` / ``*_file`` / ``*_folder``,
plus ``base_model``. So a key a new model family adds (``vae_path``, ``text_encoder_path``...) is confined the day it
lands. A text-typed path key (``base_model``) may instead hold a hub id (``org/name``) that names no local file.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..config import TrainConfig

SERVICE_OWNED = ("output_dir",)  # decided by the service
JOB_WRITABLE = ("cache_dir",)  # inside the job's folder or <home>/cache
ALWAYS_PATHS = ("base_model",)  # text-typed, but a local folder or file when it is not a hub id
PATH_SUFFIXES = ("_path", "_dir", "_file", "_folder")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
NAME_MAX, PATH_MAX = 255, 4096


def _holds_path(annotation: Any) -> bool:
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, os.PathLike)):
        return True
    return any(_holds_path(arg) for arg in typing.get_args(annotation))


def _holds_text(annotation: Any) -> bool:
    return annotation is str or any(_holds_text(arg) for arg in typing.get_args(annotation))


def _sections(annotation: Any) -> list[type[BaseModel]]:
    found = [annotation] if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []
    for arg in typing.get_args(annotation):
        found += _sections(arg)
    return found


def path_keys(model: type[BaseModel] = TrainConfig, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], bool]:
    """Every key of the schema that names a file or folder (dotted as a tuple), mapped to whether it may also hold
    a hub id (a text-typed field)."""
    found: dict[tuple[str, ...], bool] = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        marked = extra.get("path") is True
        if _holds_path(info.annotation) or marked or name.endswith(PATH_SUFFIXES) or (not prefix and name in
                                                                                      ALWAYS_PATHS):
            found[(*prefix, name)] = _holds_text(info.annotation) and not _holds_path(info.annotation)
        for section in _sections(info.annotation):
            found.update(path_keys(section, (*prefix, name)))
    return found


def _error(key: tuple[str, ...], msg: str) -> dict[str, Any]:
    return {"loc": ["config", *key], "msg": msg, "type": "path_refused"}


def too_long(text: str) -> bool:
    """True if ``text`` is longer than a path or has a part longer than a file name may be (ENAMETOOLONG)."""
    return len(text) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in text.split("/"))


def resolve_under(text: str, base: Path) -> Path:
    """``text`` as a path, relative ones under ``base``, symlinks resolved."""
    path = Path(text).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def inside_roots(path: Path, roots: list[Path]) -> bool:
    """True if the resolved ``path`` is one of the resolved ``roots`` or lies inside one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def _locations(data: dict[str, Any], key: tuple[str, ...]) -> list[tuple[tuple[str, ...], dict[str, Any], Any]]:
    """Every place ``key`` names in ``data``: (the key with list indices, the mapping holding it, its value). A list
    of sections on the way (``datasets:``) is walked item by item, so each subset's paths are confined too."""
    nodes: list[tuple[tuple[str, ...], Any]] = [((), data)]
    for part in key[:-1]:
        step = []
        for where, node in nodes:
            child = node.get(part) if isinstance(node, dict) else None
            if isinstance(child, list):
                step += [((*where, part, str(i)), item) for i, item in enumerate(child)]
            elif child is not None:
                step.append(((*where, part), child))
        nodes = step
    return [((*where, key[-1]), node, node.get(key[-1])) for where, node in nodes if isinstance(node, dict)]


def confine_paths(data: dict[str, Any], home: Path, job_dir: Path, read_roots: list[Path]) -> list[dict[str, Any]]:
    """Apply the policy to raw config ``data`` in place (paths made absolute and resolved, ``output_dir`` set);
    return one error per refused key. Reads nothing but the file system's names (no file is opened)."""
    errors = []
    roots = [root.resolve() for root in read_roots]
    shown = ", ".join(str(r) for r in roots)
    for key in SERVICE_OWNED:
        if data.get(key) not in (None, ""):
            errors.append(_error((key,), f"'{key}' is set by the service (each job writes to its own folder, "
                                 f"<home>/jobs/<id>/{key.removesuffix('_dir')}); remove it"))
    data["output_dir"] = str((job_dir / "output").resolve())
    for key in JOB_WRITABLE:
        value = data.get(key)
        if value in (None, ""):
            continue
        writable = [job_dir.resolve(), (home / "cache").resolve()]
        if not isinstance(value, str) or too_long(value):
            errors.append(_error((key,), "must be a path (text) of a sensible length"))
        elif not inside_roots(path := resolve_under(value, job_dir), writable):
            errors.append(_error((key,), f"must lie inside this job's folder or the shared cache {home / 'cache'}; "
                                 f"got {value!r}"))
        else:
            data[key] = str(path)
    for key, may_be_hub_id in path_keys().items():
        if key[-1] in SERVICE_OWNED + JOB_WRITABLE and len(key) == 1:
            continue
        for where, parent, value in _locations(data, key):
            if value not in (None, ""):
                errors += _confine(where, parent, value, may_be_hub_id, home, roots, shown)
    return errors


def _confine(key: tuple[str, ...], parent: dict[str, Any], value: Any, may_be_hub_id: bool, home: Path,
             roots: list[Path], shown: str) -> list[dict[str, Any]]:
    """Resolve the path(s) of one key in place if each lies inside ``roots``; else one error naming the key."""
    errors = []
    values = value if isinstance(value, list) else [value]
    resolved = []
    for item in values:
        if not isinstance(item, str):
            errors.append(_error(key, "must be a path (text)"))
            break
        if too_long(item):
            errors.append(_error(key, f"the path is too long (at most {PATH_MAX} characters, {NAME_MAX} per "
                                 "folder or file name)"))
            break
        local = resolve_under(item, home)
        if may_be_hub_id and HUB_ID.match(item) and not os.path.lexists(local):
            resolved.append(item)  # a hub id: names no file of this server
            continue
        if not inside_roots(local, roots):
            errors.append(_error(key, f"{item!r} is outside the folders a job may read ({shown}); put it in "
                                 "the home's models or datasets folder, or start the server with "
                                 "--model-root FOLDER"))
            break
        resolved.append(str(local))
    else:
        parent[key[-1]] = resolved if isinstance(value, list) else resolved[0]
    return errors
