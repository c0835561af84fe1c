"""WD14-style image tagger (SmilingWolf ``wd-v1-4-*-tagger`` / ``wd-*-tagger-v3`` family) run through onnxruntime.

A tagger folder holds ``model.onnx`` and ``selected_tags.csv`` (header ``tag_id,name,category,count``). The model
takes one NHWC float32 tensor of **BGR** pixels in 0..255 (no normalisation) and returns one probability per CSV row.
Category 9 rows are ratings, 0 general tags, 4 characters; other categories are reported by ``tag_probabilities``
but never put in captions.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
TAGS_HEADER = ("tag_id", "name", "category", "count")
CATEGORY_GENERAL, CATEGORY_CHARACTER, CATEGORY_RATING = 0, 4, 9


@dataclass
class TaggerOptions:
    """How probabilities become a caption."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()  # compared after underscore replacement, case-insensitive
    replace_underscores: bool = True  # "long_hair" -> "long hair"; tags of length <= 3 ("^_^") are kept as they are
    include_rating: bool = False  # prepend the most probable rating tag
    batch_size: int = 8


def format_tag(name: str, replace_underscores: bool = True) -> str:
    """The tag as written in a caption. Short tags are kaomoji (``^_^``, ``>_<``) whose underscores are the face."""
    if replace_underscores and len(name) > 3:
        return name.replace("_", " ")
    return name


def choose_providers(available: Sequence[str]) -> list[str]:
    """CUDA when this onnxruntime build has it; CPU stays listed as the fallback for ops CUDA lacks."""
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_selected_tags(path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories of ``selected_tags.csv``, in row order (the order of the model's outputs)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the tag list ({exc})") from None
    reader = csv.reader(io.StringIO(text))
    header = tuple(h.strip().lower() for h in next(reader, []))
    if header != TAGS_HEADER:
        raise ConfigError(
            f"{path}:1: header must be {','.join(TAGS_HEADER)}; got {','.join(header)!r} "
            "(is this a WD14 tagger folder?)"
        )
    names: list[str] = []
    categories: list[int] = []
    for row in reader:
        if not row or all(not cell.strip() for cell in row):
            continue
        try:
            names.append(row[1].strip())
            categories.append(int(row[2]))
        except (IndexError, ValueError):
            raise ConfigError(f"{path}:{reader.line_num}: expected tag_id,name,category,count; got {row!r}") from None
    if not names:
        raise ConfigError(f"{path}: no tags after the header")
    return names, np.asarray(categories, dtype=np.int64)


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("the WD14 tagger needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def _load_image(path: Path, size: int) -> np.ndarray:
    """One image as HWC float32 BGR in 0..255: upright, alpha on white, padded to a white square, resized."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    if img.mode != "RGBA":
        img = img.convert("RGBA")  # also turns palette transparency into alpha
    # The taggers were trained on images with transparency flattened onto white; black would read as a dark scene.
    flat = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    # Pad instead of crop or stretch: the tags must describe the whole picture, and the training data was padded.
    side = max(flat.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(flat, ((side - flat.width) // 2, (side - flat.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])  # the models were converted from Keras/OpenCV pipelines: BGR


class WD14Tagger:
    """Tags images with a WD14 ONNX model; ``__call__`` returns one caption per image."""

    def __init__(self, folder: Path, options: TaggerOptions | None = None):
        self.folder = Path(folder)
        self.options = options or TaggerOptions()
        if self.options.batch_size < 1:
            raise ConfigError(f"tagger batch_size must be >= 1, got {self.options.batch_size}")
        if not self.folder.is_dir():
            raise ConfigError(f"tagger folder not found: {self.folder}")
        model_path, tags_path = self.folder / MODEL_FILE, self.folder / TAGS_FILE
        for required in (model_path, tags_path):
            if not required.is_file():
                raise ConfigError(
                    f"tagger folder {self.folder} has no {required.name} (expected {MODEL_FILE} and {TAGS_FILE})"
                )
        self.tags, self.categories = read_selected_tags(tags_path)
        ort = _import_onnxruntime()
        self.providers = choose_providers(ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(model_path), providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or unsupported files
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{model_path}: onnxruntime cannot load the model ({first_line})") from None
        model_input = self.session.get_inputs()[0]
        shape = list(model_input.shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ConfigError(f"{model_path}: expected an NHWC input [batch, size, size, 3], got {shape}")
        self.input_name: str = model_input.name
        self.size: int = shape[1]
        # A dynamic batch dim is a string or None; a fixed one (old exports use 1) caps how many images go per run.
        fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.batch_size = min(self.options.batch_size, fixed_batch) if fixed_batch else self.options.batch_size
        self._fixed_batch = fixed_batch

    def _predict(self, images: list[Path]) -> np.ndarray:
        """Probabilities ``[len(images), n_tags]``; images are decoded one batch at a time to bound memory."""
        rows: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [_load_image(Path(p), self.size) for p in images[start : start + self.batch_size]]
            batch = np.stack(chunk)
            real = len(chunk)
            if self._fixed_batch and real < self._fixed_batch:  # fixed-batch models need a full batch
                batch = np.concatenate([batch, np.repeat(batch[-1:], self._fixed_batch - real, axis=0)])
            probs = np.asarray(self.session.run(None, {self.input_name: batch})[0], dtype=np.float32)
            if probs.ndim != 2 or probs.shape[1] != len(self.tags):
                raise ConfigError(
                    f"{self.folder}: the model outputs {list(probs.shape)} but {TAGS_FILE} lists {len(self.tags)} tags"
                )
            rows.append(probs[:real])
        if not rows:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        return np.concatenate(rows)

    def tag_probabilities(self, images: list[Path]) -> list[dict[str, float]]:
        """Raw probabilities per image for every tag in the CSV, keyed by the tag's original name."""
        return [dict(zip(self.tags, map(float, row))) for row in self._predict(images)]

    def _caption(self, probs: np.ndarray) -> str:
        opts = self.options
        fmt = lambda name: format_tag(name, opts.replace_underscores)  # noqa: E731
        # Normalise the exclusions the same way so "long_hair" and "Long Hair" both exclude the tag.
        excluded = {fmt(t.strip()).lower() for t in opts.exclude_tags}

        def pick(category: int, threshold: float) -> list[str]:
            idx = [i for i in np.flatnonzero(self.categories == category) if probs[i] >= threshold]
            idx.sort(key=lambda i: (-probs[i], i))  # ties keep CSV order so captions are deterministic
            return [fmt(self.tags[i]) for i in idx]

        parts: list[str] = []
        if opts.include_rating:
            ratings = np.flatnonzero(self.categories == CATEGORY_RATING)
            if len(ratings):
                parts.append(fmt(self.tags[ratings[np.argmax(probs[ratings])]]))
        parts += pick(CATEGORY_CHARACTER, opts.character_threshold)
        parts += pick(CATEGORY_GENERAL, opts.general_threshold)
        return ", ".join(p for p in parts if p.lower() not in excluded)

    def __call__(self, images: list[Path]) -> list[str]:
        """One caption per image: characters, then general tags, each by probability descending."""
        return [self._caption(row) for row in self._predict(images)]
