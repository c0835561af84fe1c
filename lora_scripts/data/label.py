"""Auto-labelling: write ``filename,prompt`` rows for a folder of images.

Back-ends: ``caption`` (an image-captioning model through transformers, BLIP by default), ``tagger`` (a WD14-style
ONNX tagger, see :mod:`.tagger`), ``sidecar`` (existing ``.txt`` / ``.caption`` files beside the images) and
``filename`` (the file name as the caption).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConfigError, DataError
from ..train.checkpoint import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECAR_EXTENSIONS = (".txt", ".caption")
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
BACKENDS = ("caption", "tagger", "sidecar", "filename")


@dataclass
class LabelOptions:
    """What ``lora-scripts label`` / ``tools/auto_label.py`` was asked to do."""

    backend: str = "caption"
    model: str | None = None
    trigger: str | None = None
    prefix: str | None = None
    existing: str = "skip"  # skip (keep rows already in the output) | overwrite | append (old + ", " + new)
    recursive: bool = False
    batch_size: int = 8
    max_new_tokens: int = 30
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()


@dataclass
class LabelResult:
    rows: list[tuple[str, str]]
    labelled: int
    kept: int
    missing_sidecars: list[str]


def list_images(folder: Path, recursive: bool = False) -> list[str]:
    """Image paths relative to ``folder`` (posix separators), sorted."""
    if not folder.is_dir():
        raise DataError(f"--input: folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    found = [p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p.relative_to(folder).as_posix() for p in found)


def read_existing_rows(path: Path) -> dict[str, str]:
    """Rows of an existing ``filename,prompt`` CSV (empty if there is none)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "filename" not in reader.fieldnames or "prompt" not in reader.fieldnames:
            raise DataError(f"{path}: existing file has no filename,prompt header; use --overwrite to replace it")
        return {row["filename"]: row["prompt"] or "" for row in reader}


def write_metadata(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    """Write ``filename,prompt`` rows atomically; the csv module quotes commas, quotes and newlines."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filename", "prompt"])
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def caption_from_filename(name: str) -> str:
    """``red_circle-02.png`` -> ``red circle``: separators to spaces, bare numbers dropped."""
    words = re.split(r"[\s_\-.]+", Path(name).stem)
    return " ".join(w for w in words if w and not w.isdigit())


def caption_from_sidecar(image: Path) -> str | None:
    """The text of ``image``'s ``.txt`` or ``.caption`` file, stripped and on one line, or None."""
    for ext in SIDECAR_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            return " ".join(side.read_text(encoding="utf-8", errors="replace").split())
    return None


class BlipCaptioner:
    """Batched captions from a transformers image-to-text model (BLIP by default)."""

    def __init__(self, model: str, batch_size: int = 8, max_new_tokens: int = 30):
        import torch
        from transformers import AutoProcessor, BlipForConditionalGeneration

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = BlipForConditionalGeneration.from_pretrained(model).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model: could not load captioning model '{model}': {str(exc).splitlines()[0]}") from None
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def __call__(self, images: list[Path]) -> list[str]:
        import torch
        from PIL import Image, ImageOps

        pictures = []
        for path in images:
            with Image.open(path) as img:
                pictures.append(ImageOps.exif_transpose(img).convert("RGB"))
        inputs = self.processor(images=pictures, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def label_folder(
    input_dir: Path, output: Path, options: LabelOptions,
    make_progress: Callable[[int], Callable[[int], None]] | None = None,
) -> LabelResult:
    """Label every image in ``input_dir`` and write ``output``; returns what was done.

    ``make_progress(total)`` is called once the input is checked and any model loaded, and returns an ``update(n)``.
    """
    if options.backend not in BACKENDS:
        raise ConfigError(f"--backend: '{options.backend}' is not one of {', '.join(BACKENDS)}")
    images = list_images(input_dir, options.recursive)
    if not images:
        raise DataError(f"--input: no images ({', '.join(IMAGE_EXTENSIONS)}) in {input_dir}")
    existing = {} if options.existing == "overwrite" else read_existing_rows(output)
    todo = [name for name in images if options.existing != "skip" or name not in existing]

    captioner: Callable[[list[Path]], list[str]] | None = None
    if options.backend == "caption":
        captioner = BlipCaptioner(options.model or DEFAULT_CAPTION_MODEL, options.batch_size, options.max_new_tokens)
    elif options.backend == "tagger":
        from .tagger import TaggerOptions, WD14Tagger

        if not options.model:
            raise ConfigError("--model: the tagger back-end needs a folder with model.onnx and selected_tags.csv")
        captioner = WD14Tagger(Path(options.model), TaggerOptions(
            general_threshold=options.general_threshold, character_threshold=options.character_threshold,
            exclude_tags=options.exclude_tags, batch_size=options.batch_size))
    progress = make_progress(len(todo)) if make_progress else None
    captions: dict[str, str] = {}
    missing: list[str] = []
    if options.backend == "filename":
        captions = {name: caption_from_filename(name) for name in todo}
        if progress:
            progress(len(todo))
    elif options.backend == "sidecar":
        for name in todo:
            text = caption_from_sidecar(input_dir / name)
            if text is None:
                missing.append(name)
            else:
                captions[name] = text
            if progress:
                progress(1)
    else:
        for start in range(0, len(todo), options.batch_size):
            chunk = todo[start : start + options.batch_size]
            captions.update(zip(chunk, captioner([input_dir / n for n in chunk])))
            if progress:
                progress(len(chunk))

    rows = []
    for name in images:
        if name in captions:
            text = _decorate(captions[name], options)
            if options.existing == "append" and existing.get(name):
                text = f"{existing[name]}, {captions[name]}"
            rows.append((name, text))
        elif name in existing:
            rows.append((name, existing[name]))
    write_metadata(output, rows)
    return LabelResult(rows, labelled=len(captions), kept=len(rows) - len(captions), missing_sidecars=missing)


def _decorate(caption: str, options: LabelOptions) -> str:
    parts = [p for p in (options.trigger, options.prefix, caption) if p]
    return ", ".join(parts)
