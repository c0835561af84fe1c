"""Captioned images: read and check ``metadata.csv``, load images into training tensors.

The check runs before any model is loaded, so bad data costs seconds, not GPU time.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageOps

from ..errors import DataError

REQUIRED_COLUMNS = ("filename", "prompt")


@dataclass(frozen=True)
class CaptionedImage:
    path: Path
    prompt: str
    subset: int = 0  # index of its subset (see .subsets)
    mask: Path | None = None  # its mask image, when the subset has a mask_dir


@dataclass(frozen=True)
class ImageDataSummary:
    """What the data check found: the samples and a content hash for provenance."""

    samples: list[CaptionedImage]
    dataset_hash: str
    source: str = ""


def check_data_dir(train_data_dir: Path) -> None:
    """Raise a DataError unless ``train_data_dir`` is an existing folder."""
    if not train_data_dir.exists():
        raise DataError(f"train_data_dir not found: {train_data_dir} (check the path in the config)")
    if not train_data_dir.is_dir():
        raise DataError(f"train_data_dir is not a directory: {train_data_dir} (point it at the folder of training data)")


def read_text_file(path: Path, what: str = "file") -> str:
    """A UTF-8 text file (a BOM is dropped), newlines untranslated; errors name the file and line and say what to do."""
    if path.is_dir():
        raise DataError(f"{what} is a directory, not a file: {path} (point it at the file inside)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror or exc}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None


def read_metadata(train_data_dir: Path, metadata_path: Path, problems: list[str] | None = None) -> list[CaptionedImage]:
    """Parse ``metadata.csv`` (header ``filename,prompt``); every error names the file and line. With ``problems``,
    rows naming a missing image are listed there instead of stopping the read (the check goes on)."""
    check_data_dir(train_data_dir)
    if not metadata_path.exists():
        raise DataError(
            f"metadata_path not found: {metadata_path} (create it with `python tools/auto_label.py --input "
            f"{train_data_dir} --output {metadata_path}` or write a CSV with header filename,prompt)"
        )
    # newline="": line breaks inside quoted prompts are kept as written, and \r, \n, \r\n all end a row
    reader = csv.reader(io.StringIO(read_text_file(metadata_path, "metadata_path"), newline=""))
    try:
        return _read_rows(reader, train_data_dir, metadata_path, problems)
    except csv.Error as exc:
        raise DataError(f"{metadata_path}:{reader.line_num}: malformed CSV ({exc}); quote prompts that hold commas, "
                        "quotes or line breaks (the csv module or lora-scripts label write them correctly)") from None


def _read_rows(reader: Any, train_data_dir: Path, metadata_path: Path,
               problems: list[str] | None = None) -> list[CaptionedImage]:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{metadata_path}: the file is empty; expected a header line `filename,prompt`")
    columns = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{metadata_path}:1: header must name the columns filename,prompt; got {','.join(header)!r} "
            f"(missing {', '.join(missing)})"
        )
    i_file, i_prompt = columns.index("filename"), columns.index("prompt")
    samples: list[CaptionedImage] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(i_file, i_prompt):
            raise DataError(f"{metadata_path}:{line}: expected {len(columns)} columns, got {len(row)}; write "
                            f"{','.join(header)} on every line (quote prompts that hold commas)")
        name, prompt = row[i_file].strip(), row[i_prompt].strip()
        if not name:
            raise DataError(f"{metadata_path}:{line}: empty filename; name the image or remove the line")
        path = train_data_dir / name
        if not path.is_file():
            message = (f"{metadata_path}:{line}: image '{name}' not found in {train_data_dir}; fix the name or "
                       "remove the line")
            if problems is None:
                raise DataError(message)
            problems.append(message)
            continue
        samples.append(CaptionedImage(path, prompt))
    if not samples and not problems:
        raise DataError(f"{metadata_path}: no rows after the header; add one `filename,prompt` line per image")
    return samples


def check_image_dataset(train_data_dir: Path, metadata_path: Path, caption_source: str = "auto") -> ImageDataSummary:
    """Check every caption and image (see :mod:`.check`); raise the first error, return samples and dataset hash."""
    from .check import check_images

    report = check_images(train_data_dir, metadata_path, resolution=0, caption_source=caption_source)
    raise_for_errors(report)
    return ImageDataSummary(report.samples, report.dataset_hash, report.source)


def raise_for_errors(report) -> None:
    """Raise the report's first error as a one-line DataError (counting the others)."""
    if report.errors:
        more = len(report.errors) - 1
        suffix = f" (and {more} more errors: run `lora-scripts check --config ...` for the full report)" if more else ""
        raise DataError(report.errors[0].message + suffix)


class Crop(NamedTuple):
    """Where a training image came from: SDXL conditions on the original size and the crop's top-left corner."""

    original_hw: tuple[int, int]
    top_left: tuple[int, int]


def load_image_tensor(
    path: Path, resolution: int | tuple[int, int], rng: np.random.Generator, random_crop: bool = False,
    random_flip: bool = False,
) -> np.ndarray:
    """Load an image as float32 CHW in [-1, 1]: any PIL mode to RGB, resized to cover the target, then cropped.

    ``resolution`` is a square side or a (width, height) bucket. ``rng`` is a per-sample generator so augmentation
    is reproducible and independent of batch layout.
    """
    return load_image(path, resolution, rng, random_crop, random_flip)[0]


def load_image(
    path: Path, resolution: int | tuple[int, int], rng: np.random.Generator, random_crop: bool = False,
    random_flip: bool = False,
) -> tuple[np.ndarray, Crop]:
    """:func:`load_image_tensor` plus the :class:`Crop` it took."""
    pixels, crop, _ = load_image_and_mask(path, resolution, rng, random_crop, random_flip)
    return pixels, crop


def _grey(img: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB-able: 16-bit or float grey scaled, not clipped at 255."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float32)
        top = 1.0 if img.mode == "F" and grey.max() <= 1.0 else 65535.0 if grey.max() > 255 else 255.0
        img = Image.fromarray(np.clip(grey * (255.0 / top), 0, 255).round().astype(np.uint8))
    return img


def has_alpha(img: Image.Image) -> bool:
    """Whether a PIL image carries transparency (RGBA, LA, PA or a palette with a transparent index)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def read_mask(mask_path: Path, size: tuple[int, int]) -> Image.Image:
    """A mask file as 8-bit grey, upright, at ``size`` (the check reports a mask of another size)."""
    with Image.open(mask_path) as mask:
        mask = ImageOps.exif_transpose(mask)
        mask = _grey(mask).convert("L")
        return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def load_image_and_mask(
    path: Path, resolution: int | tuple[int, int], rng: np.random.Generator, random_crop: bool = False,
    random_flip: bool = False, *, mask_path: Path | None = None, alpha_mask: bool = False,
) -> tuple[np.ndarray, Crop, np.ndarray | None]:
    """:func:`load_image` plus the loss mask (float32 HW in [0, 1], None when neither ``mask_path`` nor
    ``alpha_mask`` is given): the image's alpha channel and/or the mask file, multiplied, resized, cropped and
    flipped exactly as the image is."""
    target_w, target_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        img = _grey(img)
        mask: Image.Image | None = None
        if alpha_mask or mask_path is not None:
            mask = Image.new("L", img.size, 255)
            if alpha_mask and has_alpha(img):
                mask = img.convert("RGBA").getchannel("A")
            if mask_path is not None:
                mask = ImageChops.multiply(mask, read_mask(mask_path, img.size))
        if img.mode in ("RGBA", "LA", "P") and (img.mode != "P" or "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
        w, h = img.size
        scale = max(target_w / w, target_h / h)
        new_w, new_h = max(target_w, round(w * scale)), max(target_h, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if random_crop:
            left = int(rng.integers(0, new_w - target_w + 1))
            top = int(rng.integers(0, new_h - target_h + 1))
        else:
            left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
        box = (left, top, left + target_w, top + target_h)
        img = img.crop(box)
        flip = random_flip and rng.random() < 0.5
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        mask_array = None
        if mask is not None:  # the same geometry as the image (bilinear: a mask has no detail to sharpen)
            mask = mask.resize((new_w, new_h), Image.Resampling.BILINEAR).crop(box)
            if flip:
                mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask_array = np.asarray(mask, dtype=np.float32) / 255.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)), Crop((h, w), (top, left)), mask_array


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask averaged over each ``factor`` x ``factor`` block: its weight per latent pixel (the area
    interpolation sd-scripts uses; exact because image sides are multiples of the factor)."""
    h, w = mask.shape
    return mask[: h // factor * factor, : w // factor * factor].reshape(h // factor, factor, w // factor,
                                                                          factor).mean(axis=(1, 3))


def center_crop(width: int, height: int, resolution: int | tuple[int, int]) -> Crop:
    """The :class:`Crop` that :func:`load_image` takes without ``random_crop``, from the image size alone."""
    target_w, target_h = (resolution, resolution) if isinstance(resolution, int) else resolution
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    return Crop((height, width), ((new_h - target_h) // 2, (new_w - target_w) // 2))


def augment_caption(
    prompt: str, rng: np.random.Generator, *, shuffle_tags: bool = False, keep_tokens: int = 0,
    trigger_word: str | None = None, caption_dropout: float = 0.0,
) -> str:
    """Caption options, driven by the sample's own generator: tag shuffling (the first ``keep_tokens`` tags stay),
    a trigger word put first, and caption dropout (an empty caption, so the LoRA also learns unconditioned)."""
    drop = caption_dropout > 0 and rng.random() < caption_dropout  # drawn first so the other options don't shift it
    tags = [t.strip() for t in prompt.split(",") if t.strip()]
    if shuffle_tags and len(tags) > keep_tokens + 1:
        rest = tags[keep_tokens:]
        tags = tags[:keep_tokens] + [rest[i] for i in rng.permutation(len(rest))]
    if trigger_word and trigger_word not in tags:
        tags.insert(0, trigger_word)
    return "" if drop else ", ".join(tags) if (shuffle_tags or trigger_word) else prompt
