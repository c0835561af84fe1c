"""The image data check behind ``lora-scripts check`` and the start of ``train``: every problem at once, as a
readable report or JSON for CI. Loads no model (only the tokenizer, to count caption tokens)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .captions import read_captions
from .images import CaptionedImage, has_alpha
from .label import list_images
from .subsets import Subset, describe_epoch, epoch_entries, find_mask, read_subset_captions

HUGE_FACTOR = 8  # an image more than 8x resolution on both sides is decoded and downscaled every draw: a warning


@dataclass
class Finding:
    level: str  # "error" stops training; "warning" is reported
    code: str
    message: str


@dataclass
class DataReport:
    """What the check found."""

    source: str = ""
    num_samples: int = 0
    dataset_hash: str = ""
    findings: list[Finding] = field(default_factory=list)
    samples: list[CaptionedImage] = field(default_factory=list, repr=False)
    sizes: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (width, height) upright, per sample
    hashes: list[str] = field(default_factory=list, repr=False)  # sha256 of each image file, per sample
    epoch: str = ""  # what one epoch draws, e.g. "40 samples per epoch: 10_a: 3 images x 10, 5_b: 2 images x 5"
    subsets: list[Subset] = field(default_factory=list, repr=False)
    entries: list[int] = field(default_factory=list, repr=False)  # the sample indices of one epoch

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: str, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def to_json(self) -> str:
        data: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("samples", "sizes", "hashes", "subsets",
                                                                         "entries")}
        data.update(ok=not self.errors, errors=len(self.errors), warnings=len(self.warnings))
        return json.dumps(data, indent=2)

    def render(self) -> str:
        head = f"{self.num_samples} captioned images from {self.source}" if self.source else "no data read"
        lines = [f"{'ok' if not self.errors else 'FAILED'}: {head}; {len(self.errors)} errors, "
                 f"{len(self.warnings)} warnings"]
        if self.epoch:
            lines.append(f"  {self.epoch}")
        lines += [f"  {f.level}: {f.message}" for f in self.findings]
        return "\n".join(lines)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _decoded_size(data: bytes) -> tuple[int, int, bool]:
    """Fully decode an image (verify() misses truncated files) and return its upright (width, height) and whether
    it has an alpha channel. Files over
    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) raise: training would decode them every draw."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return (*ImageOps.exif_transpose(img).size, has_alpha(img))


def check_images(
    train_data_dir: Path, metadata_path: Path | None, resolution: int, caption_source: str = "auto",
    max_caption_tokens: int | None = None, tokenizer: Any = None,
) -> DataReport:
    """Check the captions and images of one folder; collect every finding instead of stopping at the first."""
    subset = Subset(image_dir=train_data_dir, metadata_path=metadata_path or train_data_dir / "metadata.csv",
                    name=train_data_dir.name, caption_source=caption_source, resolution=resolution)
    return check_subsets([subset], max_caption_tokens=max_caption_tokens, tokenizer=tokenizer)


def check_subsets(
    subsets: list[Subset], problems: list[tuple[str, str]] | None = None,
    max_caption_tokens: int | None = None, tokenizer: Any = None,
) -> DataReport:
    """Check every subset's captions, images and masks (see :mod:`.subsets`); one subset's broken captions do not
    hide another's broken images. ``problems``: (code, message) errors already found in folder names."""
    report = DataReport(subsets=list(subsets))
    for code, message in problems or []:
        report.add("error", code, message)
    samples: list[CaptionedImage] = []
    sources = []
    for index, subset in enumerate(subsets):
        if (subset.is_reg or len(subsets) > 1) and not subset.image_dir.is_dir():
            kind = "regularisation folder" if subset.is_reg else "subset folder"
            report.add("error", "missing_dir", f"{subset.image_dir}: {kind} not found; fix the path in the config")
            continue
        try:
            found, source, missing = read_subset_captions(subset)
        except DataError as exc:
            report.add("error", "captions", str(exc))
            continue
        for message in missing:
            report.add("error", "missing_image", message)
        if not found:
            if not missing:
                report.add("error", "empty_subset", f"{subset.image_dir}: no captioned images in this folder; add "
                           "images or remove it from the dataset")
            continue
        if subset.mask_dir is not None:
            found = [replace(s, mask=find_mask(subset.mask_dir, s.path)) for s in found]
        samples += [replace(s, subset=index) for s in found]
        sources.append(source)
    report.source = sources[0] if len(sources) == 1 else f"{len(sources)} folders" if sources else ""
    if not samples:
        return report
    digest = hashlib.sha256()
    by_content: dict[str, str] = {}
    rows = Counter(s.path for s in samples)
    for path, n in rows.items():
        if n > 1:
            report.add("warning", "duplicate_row", f"{path.name} is listed {n} times in {report.source} and is "
                       f"trained {n} times as often; remove the extra rows unless that is intended")
    no_alpha = []
    for sample in samples:
        subset = subsets[sample.subset]
        side = subset.resolution
        try:
            data = sample.path.read_bytes()
            width, height, alpha = _decoded_size(data)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            report.add("error", "too_large", f"{sample.path}: too large to decode safely ({_first_line(exc)}; PIL's "
                       "Image.MAX_IMAGE_PIXELS); downscale the file or remove it")
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            report.add("error", "unreadable", f"{sample.path}: unreadable image ({_reason(exc)}); fix or remove it "
                       f"from {report.source}")
            continue
        report.sizes.append((width, height))
        content = hashlib.sha256(data).hexdigest()
        report.hashes.append(content)
        if content in by_content and by_content[content] != sample.path.name:
            report.add("warning", "duplicate_file", f"{sample.path.name} has the same content as {by_content[content]}")
        by_content.setdefault(content, sample.path.name)
        if min(width, height) < side / 4:
            report.add("error", "too_small", f"{sample.path}: {width}x{height} is unusably small for resolution "
                       f"{side} (under a quarter); remove it or lower resolution")
        elif min(width, height) < side:
            report.add("warning", "small", f"{sample.path.name}: {width}x{height} is smaller than resolution "
                       f"{side} and will be upscaled")
        elif side and min(width, height) > HUGE_FACTOR * side:
            report.add("warning", "huge", f"{sample.path.name}: {width}x{height} is over {HUGE_FACTOR}x resolution "
                       f"{side} and is decoded and downscaled at every draw (slow); downscale the file or set "
                       "cache_latents")
        if not sample.prompt.strip():
            report.add("warning", "empty_caption", f"{sample.path.name}: empty caption")
        if subset.alpha_mask and not alpha:
            no_alpha.append(sample.path.name)
        mask_hash = _check_mask(report, sample, subset, (width, height))
        digest.update(sample.path.name.encode() + b"\0" + sample.prompt.encode() + b"\0" + bytes.fromhex(content))
        if subset.num_repeats != 1 or subset.is_reg or subset.masked:  # default datasets keep their old hash
            digest.update(f"{subset.num_repeats}:{subset.is_reg}:{subset.alpha_mask}:{mask_hash}".encode())
    if no_alpha:
        report.add("warning", "no_alpha", f"{len(no_alpha)} images have no alpha channel and train everywhere "
                   f"under alpha_mask (e.g. {no_alpha[0]})")

    counts = Counter(s.prompt for s in samples if s.prompt.strip())
    for prompt, n in counts.items():
        if n > 1 and prompt not in {s.class_tokens for s in subsets}:  # a kohya folder's token: shared by design
            report.add("warning", "duplicate_caption", f"{n} images share the caption {prompt!r}")
    captioned = {s.path.resolve() for s in samples}
    for subset in subsets:
        if not subset.image_dir.is_dir():
            continue
        uncaptioned = [n for n in list_images(subset.image_dir) if (subset.image_dir / n).resolve() not in captioned]
        if uncaptioned:
            report.add("warning", "uncaptioned", f"{len(uncaptioned)} images in {subset.image_dir} have no caption "
                       f"and are not used (e.g. {uncaptioned[0]})")
    if tokenizer is not None and max_caption_tokens:
        long = [s for s in samples if len(tokenizer(s.prompt).input_ids) > max_caption_tokens]
        if long:
            report.add("warning", "long_caption", f"{len(long)} captions exceed the text encoder's "
                       f"{max_caption_tokens} tokens and are cut (e.g. {long[0].path.name})")
    report.samples, report.num_samples, report.dataset_hash = samples, len(samples), digest.hexdigest()
    report.entries = epoch_entries(samples, subsets)
    if not report.entries:
        report.add("error", "no_training_images", "only regularisation images were found; add training images "
                   "(a subset without is_regularization)")
    elif len(report.entries) != len(samples) or len(subsets) > 1:  # a plain folder: one epoch is its images
        report.epoch = describe_epoch(samples, subsets, report.entries)
    return report


def _reason(exc: Exception) -> str:
    return ("not an image format PIL can read" if isinstance(exc, UnidentifiedImageError)
            else getattr(exc, "strerror", None) or _first_line(exc))


def _check_mask(report: DataReport, sample: CaptionedImage, subset: Subset, size: tuple[int, int]) -> str:
    """Report a missing, unreadable or wrongly sized mask; return the mask file's sha256 ("" without one)."""
    if subset.mask_dir is None:
        return ""
    if sample.mask is None:
        report.add("error", "missing_mask", f"{sample.path}: no mask named {sample.path.stem}.* in "
                   f"{subset.mask_dir}; add one (white trains, black is ignored) or move the image out")
        return ""
    try:
        data = sample.mask.read_bytes()
        width, height, _ = _decoded_size(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        report.add("error", "unreadable_mask", f"{sample.mask}: unreadable mask ({_reason(exc)}); fix or "
                   "replace it")
        return ""
    if (width, height) != size:
        report.add("error", "mask_size", f"{sample.mask}: mask is {width}x{height} but its image "
                   f"{sample.path.name} is {size[0]}x{size[1]}; save the mask at the image's size")
    return hashlib.sha256(data).hexdigest()
