"""Where image captions come from: ``metadata.csv``, sidecar ``.txt``/``.caption`` files, kohya's json, or
imagefolder-style ``metadata.jsonl``. ``caption_source: auto`` picks by what exists."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from .images import CaptionedImage, check_data_dir, read_metadata, read_text_file
from .label import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, caption_from_sidecar, list_images

CAPTION_SOURCES = ("auto", "csv", "sidecar", "kohya_json", "jsonl")
_FILE_KEYS = ("file_name", "filename", "image", "path")
_TEXT_KEYS = ("text", "caption", "prompt")


def resolve_caption_source(train_data_dir: Path, metadata_path: Path, source: str = "auto") -> str:
    """The caption source to use: ``source`` itself, or for ``auto`` the first of these that exists: metadata_path
    (by suffix), ``<train_data_dir>/metadata.jsonl``, sidecar files."""
    if source != "auto":
        return source
    if metadata_path.is_file():
        return {".json": "kohya_json", ".jsonl": "jsonl"}.get(metadata_path.suffix.lower(), "csv")
    if (train_data_dir / "metadata.jsonl").is_file():
        return "jsonl"
    if train_data_dir.is_dir() and any(p.suffix.lower() in SIDECAR_EXTENSIONS for p in train_data_dir.iterdir()):
        return "sidecar"
    return "csv"  # read_metadata explains what is missing


def read_captions(train_data_dir: Path, metadata_path: Path, source: str = "auto",
                  problems: list[str] | None = None) -> tuple[list[CaptionedImage], str]:
    """All (image, caption) pairs and the description of where they came from. With ``problems``, entries that
    name a missing image are listed there instead of stopping the read."""
    check_data_dir(train_data_dir)
    kind = resolve_caption_source(train_data_dir, metadata_path, source)
    if kind == "csv":
        return read_metadata(train_data_dir, metadata_path, problems), str(metadata_path)
    if kind == "sidecar":
        return _read_sidecars(train_data_dir), f"sidecar caption files in {train_data_dir}"
    path = metadata_path if metadata_path.is_file() or kind == "kohya_json" else train_data_dir / "metadata.jsonl"
    if not path.is_file():
        raise DataError(f"metadata_path not found: {path} (caption_source: {kind})")
    if kind == "kohya_json":
        return _read_kohya_json(train_data_dir, path, problems), str(path)
    return _read_jsonl(train_data_dir, path, problems), str(path)


def _read_sidecars(folder: Path) -> list[CaptionedImage]:
    samples, missing = [], []
    for name in list_images(folder):
        caption = caption_from_sidecar(folder / name)
        if caption is None:
            missing.append(name)
        else:
            samples.append(CaptionedImage(folder / name, caption))
    if missing:
        raise DataError(
            f"{folder}: {len(missing)} images have no .txt/.caption file (e.g. {missing[0]}); add captions "
            "(lora-scripts label --backend ...) or move the images out"
        )
    if not samples:
        raise DataError(f"{folder}: no images with sidecar captions")
    return samples


def _find_image(folder: Path, key: str) -> Path | None:
    path = folder / key
    if path.is_file():
        return path
    for ext in IMAGE_EXTENSIONS:  # kohya keys are often the path without its extension
        candidate = folder / f"{key}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _loads(path: Path, line: int, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line + exc.lineno - 1}: invalid JSON ({exc.msg}); fix the syntax there") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer over Python's digit limit, or absurd nesting
        raise DataError(f"{path}:{line}: invalid JSON ({str(exc)[:80]}); fix the value there") from None


def _missing(problems: list[str] | None, message: str) -> None:
    if problems is None:
        raise DataError(message)
    problems.append(message)


def _read_kohya_json(folder: Path, path: Path, problems: list[str] | None = None) -> list[CaptionedImage]:
    """kohya's fine-tuning metadata: ``{image_key: {"caption": ..., "tags": ...}}``; caption and tags are joined."""
    data = _loads(path, 1, read_text_file(path, "metadata_path"))
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object mapping image keys to {{caption, tags}}; write kohya's format")
    samples = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {key!r} must be an object with caption and/or tags; write "
                            f'"{key}": {{"caption": "..."}}')
        caption = ", ".join(str(entry[k]).strip() for k in ("caption", "tags") if entry.get(k))
        image = _find_image(folder, key) or _find_image(folder, Path(key).name)
        if image is None:
            _missing(problems, f"{path}: image for key {key!r} not found in {folder}; fix the key or remove the entry")
            continue
        samples.append(CaptionedImage(image, caption))
    if not samples and not problems:
        raise DataError(f"{path}: no entries")
    return samples


def _read_jsonl(folder: Path, path: Path, problems: list[str] | None = None) -> list[CaptionedImage]:
    """Imagefolder ``metadata.jsonl``: one ``{"file_name": ..., "text": ...}`` per line (also image/caption/prompt)."""
    samples = []
    for line_no, line in enumerate(read_text_file(path, "metadata_path").split("\n"), start=1):
        if not line.strip():
            continue
        row = _loads(path, line_no, line)
        name = next((row[k] for k in _FILE_KEYS if isinstance(row, dict) and k in row), None)
        text = next((row[k] for k in _TEXT_KEYS if isinstance(row, dict) and k in row), None)
        if name is None or text is None:
            raise DataError(f"{path}:{line_no}: needs a file_name and a text (or caption/prompt) field; write "
                            '{"file_name": "img.png", "text": "..."}')
        image = _find_image(folder, str(name))
        if image is None:
            _missing(problems, f"{path}:{line_no}: image '{name}' not found in {folder}; fix the name or remove "
                     "the line")
            continue
        samples.append(CaptionedImage(image, str(text).strip()))
    if not samples and not problems:
        raise DataError(f"{path}: no rows")
    return samples
