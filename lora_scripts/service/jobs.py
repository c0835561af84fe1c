"""Turning a submitted job (form fields and/or YAML) into a validated config, with every error per field.

The schema is the trainer's own :class:`~lora_scripts.config.TrainConfig`, so the service accepts exactly what
``lora-scripts train`` accepts. The service adds the path policy of :mod:`.job_paths` (its own ``output_dir`` per
job; inputs only from the home's datasets and models or ``--model-root``), checked before any file is read;
``resume`` is the service's business.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import TrainConfig, _field_names, _section_model, _suggest
from .job_paths import confine_paths
from .security import SAFE_NAME

SERVICE_KEYS = ("resume",)
REMOTE_CODE_REFUSED = ("trust_remote_code: true would run the model's own Python code on this server; the operator "
                       "must start the service with --allow-remote-code (LORA_SCRIPTS_ALLOW_REMOTE_CODE=1) to allow "
                       "it, or remove the key")


class JobConfigError(Exception):
    """A submitted job config is invalid; ``errors`` holds one entry per field: {loc, msg, type}."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _error(loc: list[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def parse_yaml(text: str) -> dict[str, Any]:
    """The YAML text of a job config as a mapping (errors name the line)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JobConfigError([_error(["config_yaml"], f"{where}YAML syntax error: {problem}")]) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise JobConfigError([_error(["config_yaml"], f"YAML value cannot be read: {exc}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError([_error(["config_yaml"], "the config must be a mapping of key: value lines")])
    return data


def _pydantic_errors(err: ValidationError) -> list[dict[str, Any]]:
    out = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = f"unknown key '{'.'.join(loc)}'{_suggest(loc[-1], _field_names(_section_model(tuple(loc[:-1]))))}"
        elif item["type"] == "missing":
            msg = "required"
        out.append(_error(["config", *loc], msg, item["type"]))
    return out


def output_name_for(job_name: str | None) -> str:
    """A file name for the LoRA from the job's name: ``My style v2`` -> ``My_style_v2``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", job_name or "").strip("._-")[:80] or "lora"


def build_job_config(
    home: Path, job_dir: Path, config_yaml: str | None, fields: dict[str, Any] | None, dataset_dir: Path | None,
    job_name: str | None = None, read_roots: list[Path] | None = None, allow_remote_code: bool = False,
) -> TrainConfig:
    """Validate a submission: YAML first, form ``fields`` on top, the dataset's folders unless given, the path
    policy (inputs inside ``read_roots``, default the home's datasets and models), then the trainer's schema.
    ``trust_remote_code: true`` only when the operator allowed it (``allow_remote_code``): it runs code that came
    with a model folder, with the service's permissions. Raises :class:`JobConfigError` listing every problem
    found. The LoRA file is named after the job unless ``output_name`` is set."""
    data = parse_yaml(config_yaml or "")
    data.update({k: v for k, v in (fields or {}).items() if v is not None and v != ""})
    data.setdefault("output_name", output_name_for(job_name))
    errors: list[dict[str, Any]] = []
    for key in SERVICE_KEYS:
        if key in data:
            errors.append(_error(["config", key], f"'{key}' is set by the service (use the job's Resume button or "
                                 "POST /api/jobs/{id}/resume); remove it"))
            data.pop(key)
    if dataset_dir is not None:
        data.setdefault("train_data_dir", str(dataset_dir))
        data.setdefault("metadata_path", str(dataset_dir / "metadata.csv"))
    errors += confine_paths(data, home, job_dir, read_roots or [home / "datasets", home / "models"])
    name = data.get("output_name")
    if name is not None and not (isinstance(name, str) and SAFE_NAME.match(name) and ".." not in name):
        # the trainer writes <output_dir>/<output_name>.safetensors: a separator or '..' would leave the folder
        errors.append(_error(["config", "output_name"], "must be a plain file name (letters, digits, '.', '_', '-', "
                             f"spaces; no folders); got {name!r}"))
        data.pop("output_name")
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as err:
        seen = {tuple(e["loc"]) for e in errors}  # a refused path is reported once, by the policy
        errors.extend(e for e in _pydantic_errors(err) if tuple(e["loc"]) not in seen)
        raise JobConfigError(errors) from None
    if cfg.trust_remote_code and not allow_remote_code:  # checked on the validated value ("yes", "true" count too)
        errors.append(_error(["config", "trust_remote_code"], REMOTE_CODE_REFUSED))
    if errors:
        raise JobConfigError(errors)
    return cfg


def dump_job_config(cfg: TrainConfig, path: Path) -> str:
    """Write the resolved config the runner passes to ``lora-scripts train --config``; return its text."""
    text = yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text
