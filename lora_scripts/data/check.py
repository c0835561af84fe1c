"""The image data check behind ``lora-scripts check`` and the start of ``train``: every problem at once, as a
readable report or JSON for CI. Loads no model (only the tokenizer, to count caption tokens)."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .captions import read_captions
from .images import CaptionedImage
from .label import list_images

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

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: str, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def to_json(self) -> str:
        data: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("samples", "sizes", "hashes")}
        data.update(ok=not self.errors, errors=len(self.errors), warnings=len(self.warnings))
        return json.dumps(data, indent=2)

    def render(self) -> str:
        head = f"{self.num_samples} captioned images from {self.source}" if self.source else "no data read"
        lines = [f"{'ok' if not self.errors else 'FAILED'}: {head}; {len(self.errors)} errors, "
                 f"{len(self.warnings)} warnings"]
        lines += [f"  {f.level}: {f.message}" for f in self.findings]
        return "\n".join(lines)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _decoded_size(data: bytes) -> tuple[int, int]:
    """Fully decode an image (verify() misses truncated files) and return its upright (width, height). Files over
    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) raise: training would decode them every draw."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return ImageOps.exif_transpose(img).size


def check_images(
    train_data_dir: Path, metadata_path: Path, resolution: int, caption_source: str = "auto",
    max_caption_tokens: int | None = None, tokenizer: Any = None,
) -> DataReport:
    """Check captions and images; collect every finding instead of stopping at the first."""
    report = DataReport()
    try:
        samples, report.source = read_captions(train_data_dir, metadata_path, caption_source)
    except DataError as exc:
        report.add("error", "captions", str(exc))
        return report
    digest = hashlib.sha256()
    by_content: dict[str, str] = {}
    rows = Counter(s.path for s in samples)
    for path, n in rows.items():
        if n > 1:
            report.add("warning", "duplicate_row", f"{path.name} is listed {n} times in {report.source} and is "
                       f"trained {n} times as often; remove the extra rows unless that is intended")
    for sample in samples:
        try:
            data = sample.path.read_bytes()
            width, height = _decoded_size(data)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            report.add("error", "too_large", f"{sample.path}: too large to decode safely ({_first_line(exc)}; PIL's "
                       "Image.MAX_IMAGE_PIXELS); downscale the file or remove it")
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            reason = ("not an image format PIL can read" if isinstance(exc, UnidentifiedImageError)
                      else getattr(exc, "strerror", None) or _first_line(exc))
            report.add("error", "unreadable", f"{sample.path}: unreadable image ({reason}); fix or remove it from "
                       f"{report.source}")
            continue
        report.sizes.append((width, height))
        content = hashlib.sha256(data).hexdigest()
        report.hashes.append(content)
        if content in by_content and by_content[content] != sample.path.name:
            report.add("warning", "duplicate_file", f"{sample.path.name} has the same content as {by_content[content]}")
        by_content.setdefault(content, sample.path.name)
        if min(width, height) < resolution / 4:
            report.add("error", "too_small", f"{sample.path}: {width}x{height} is unusably small for resolution "
                       f"{resolution} (under a quarter); remove it or lower resolution")
        elif min(width, height) < resolution:
            report.add("warning", "small", f"{sample.path.name}: {width}x{height} is smaller than resolution "
                       f"{resolution} and will be upscaled")
        elif resolution and min(width, height) > HUGE_FACTOR * resolution:
            report.add("warning", "huge", f"{sample.path.name}: {width}x{height} is over {HUGE_FACTOR}x resolution "
                       f"{resolution} and is decoded and downscaled at every draw (slow); downscale the file or set "
                       "cache_latents")
        if not sample.prompt.strip():
            report.add("warning", "empty_caption", f"{sample.path.name}: empty caption")
        digest.update(sample.path.name.encode() + b"\0" + sample.prompt.encode() + b"\0" + bytes.fromhex(content))

    counts = Counter(s.prompt for s in samples if s.prompt.strip())
    for prompt, n in counts.items():
        if n > 1:
            report.add("warning", "duplicate_caption", f"{n} images share the caption {prompt!r}")
    captioned = {s.path.resolve() for s in samples}
    uncaptioned = [n for n in list_images(train_data_dir) if (train_data_dir / n).resolve() not in captioned]
    if uncaptioned:
        report.add("warning", "uncaptioned", f"{len(uncaptioned)} images in {train_data_dir} have no caption and are "
                   f"not used (e.g. {uncaptioned[0]})")
    if tokenizer is not None and max_caption_tokens:
        long = [s for s in samples if len(tokenizer(s.prompt).input_ids) > max_caption_tokens]
        if long:
            report.add("warning", "long_caption", f"{len(long)} captions exceed the text encoder's "
                       f"{max_caption_tokens} tokens and are cut (e.g. {long[0].path.name})")
    report.samples, report.num_samples, report.dataset_hash = samples, len(samples), digest.hexdigest()
    return report
