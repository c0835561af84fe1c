"""Datasets of several folders (subsets), as kohya's sd-scripts users keep them.

Three ways in, one result (a list of :class:`Subset`):

- ``datasets:`` in the config: one entry per folder, like sd-scripts' ``[[datasets.subsets]]``;
- a ``train_data_dir`` (and ``reg_data_dir``) of ``N_token`` sub-folders, read as sd-scripts reads them: ``10_sks
  dog`` is 10 repeats, captions from sidecar files, else the folder's token ``sks dog`` as the caption;
- a plain ``train_data_dir``: one subset with the top-level caption options (what lora-scripts always did).

An epoch is a list of sample indices (:func:`epoch_entries`): each training image ``num_repeats`` times, then the
regularisation images balanced to the training count exactly as sd-scripts does. The loop's seeded plan shuffles
that list, so every repeat of an image gets its own seed (its own crop, flip, noise and timestep).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from .captions import read_captions, resolve_caption_source
from .images import CaptionedImage, check_data_dir
from .label import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS, list_images

_REPEATS = re.compile(r"^(\d+)_(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Subset:
    """One folder of training (or regularisation) images with its options resolved (nothing left to inherit)."""

    image_dir: Path
    metadata_path: Path
    name: str
    caption_source: str = "auto"
    caption_extension: str | None = None
    class_tokens: str | None = None
    num_repeats: int = 1
    is_reg: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    trigger_word: str | None = None
    keep_tokens: int = 0
    shuffle_tags: bool = False
    caption_dropout: float = 0.0
    resolution: int = 512
    alpha_mask: bool = False
    mask_dir: Path | None = None

    @property
    def masked(self) -> bool:
        return self.alpha_mask or self.mask_dir is not None

    def caption_options(self, augment: bool = True) -> dict[str, Any]:
        """Keyword arguments of :func:`.images.augment_caption` for a draw from this subset."""
        return dict(shuffle_tags=self.shuffle_tags and augment, keep_tokens=self.keep_tokens,
                    trigger_word=self.trigger_word, caption_dropout=self.caption_dropout if augment else 0.0)


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """sd-scripts' reading of a sub-folder name: ``10_sks dog`` -> (10, "sks dog"); None when the part before the
    first ``_`` is not a number (sd-scripts skips such folders)."""
    match = _REPEATS.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def is_kohya_tree(folder: Path, metadata_path: Path | None = None) -> bool:
    """A folder of ``N_token`` sub-folders: no caption file and no image at the top, some ``N_...`` sub-folder."""
    if not folder.is_dir() or (metadata_path is not None and metadata_path.is_file()):
        return False
    if (folder / "metadata.jsonl").is_file() or list_images(folder):
        return False
    return any(p.is_dir() and parse_kohya_folder(p.name) for p in folder.iterdir())


def inherited_options(cfg: Any) -> dict[str, Any]:
    """The top-level config's values of the options a subset may override."""
    return dict(trigger_word=cfg.trigger_word, keep_tokens=cfg.keep_tokens, shuffle_tags=cfg.shuffle_tags,
                caption_dropout=cfg.caption_dropout, resolution=cfg.resolution, alpha_mask=cfg.alpha_mask,
                mask_dir=cfg.mask_dir)


def _kohya_tree(root: Path, is_reg: bool, cfg: Any, problems: list[tuple[str, str]]) -> list[Subset]:
    """One subset per ``N_token`` sub-folder of ``root``; each other sub-folder is a problem (not skipped
    silently, as sd-scripts does with a log line that is easy to miss)."""
    subsets = []
    key = "reg_data_dir" if is_reg else "train_data_dir"
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_kohya_folder(folder.name)
        if parsed is None:
            problems.append(("folder_name", f"{folder}: a sub-folder of {key} must be named N_token (N repeats, "
                             "e.g. '10_sks dog'); rename it or move it out"))
            continue
        repeats, token = parsed
        if repeats < 1:
            problems.append(("folder_name", f"{folder}: {repeats} repeats trains none of its images; name it "
                             f"1_{token} or more, or move it out"))
            continue
        subsets.append(Subset(image_dir=folder, metadata_path=folder / "metadata.csv", name=folder.name,
                              caption_extension=None, class_tokens=token or None, num_repeats=repeats,
                              is_reg=is_reg, **inherited_options(cfg)))
    return subsets


def _folder_subsets(root: Path, is_reg: bool, cfg: Any, problems: list[tuple[str, str]],
                    metadata_path: Path | None = None) -> list[Subset]:
    """``root`` as a kohya tree or as one folder of captioned images."""
    metadata_path = metadata_path or root / "metadata.csv"
    if is_kohya_tree(root, metadata_path):
        return _kohya_tree(root, is_reg, cfg, problems)
    return [Subset(image_dir=root, metadata_path=metadata_path, name=root.name, caption_source=cfg.caption_source,
                   is_reg=is_reg, **inherited_options(cfg))]


def subsets_from_config(cfg: Any) -> tuple[list[Subset], list[tuple[str, str]]]:
    """The subsets a config trains on, and the (code, message) problems found in folder names."""
    problems: list[tuple[str, str]] = []
    if cfg.datasets:
        subsets = []
        for spec in cfg.datasets:
            base = inherited_options(cfg)
            base.update({k: v for k, v in spec.model_dump().items() if k in base and v is not None})
            subsets.append(Subset(
                image_dir=spec.image_dir, metadata_path=spec.metadata_path or spec.image_dir / "metadata.csv",
                name=spec.image_dir.name, caption_source=spec.caption_source,
                caption_extension=spec.caption_extension, class_tokens=spec.class_tokens,
                num_repeats=spec.num_repeats, is_reg=spec.is_regularization, caption_prefix=spec.caption_prefix,
                caption_suffix=spec.caption_suffix, **base))
    else:
        subsets = _folder_subsets(cfg.train_data_dir, False, cfg, problems, cfg.metadata_path)
    if cfg.reg_data_dir is not None:
        subsets += _folder_subsets(cfg.reg_data_dir, True, cfg, problems)
    return subsets, problems


def _sidecar_caption(image: Path, extension: str | None) -> str | None:
    for ext in (extension,) if extension else SIDECAR_EXTENSIONS:
        side = image.with_suffix(ext)
        if side.is_file():
            return " ".join(side.read_text(encoding="utf-8", errors="replace").split())
    return None


def read_subset_captions(subset: Subset) -> tuple[list[CaptionedImage], str, list[str]]:
    """A subset's (image, caption) pairs, where they came from, and the rows that name missing images (reported,
    not fatal, so the check goes on to the images). Prefix and suffix are joined to each caption here."""
    folder = subset.image_dir
    kind = resolve_caption_source(folder, subset.metadata_path, subset.caption_source)
    problems: list[str] = []
    if subset.class_tokens is not None and kind == "csv" and not subset.metadata_path.is_file():
        kind = "sidecar"  # kohya: the folder's token is the caption of images without a caption file
    if kind == "sidecar" and (subset.class_tokens is not None or subset.caption_extension):
        check_data_dir(folder)
        samples, missing = [], []
        for name in list_images(folder):
            caption = _sidecar_caption(folder / name, subset.caption_extension)
            if caption is None and subset.class_tokens is None:
                missing.append(name)
            else:
                samples.append(CaptionedImage(folder / name, subset.class_tokens if caption is None else caption))
        if missing:
            raise DataError(f"{folder}: {len(missing)} images have no {subset.caption_extension} file (e.g. "
                            f"{missing[0]}); add captions or set class_tokens (the caption of uncaptioned images)")
        source = f"{folder} (sidecar captions" + (f", else '{subset.class_tokens}')" if subset.class_tokens else ")")
    else:
        samples, source = read_captions(folder, subset.metadata_path, kind, problems=problems)
    if subset.caption_prefix or subset.caption_suffix:
        samples = [replace(s, prompt=" ".join(p for p in (subset.caption_prefix, s.prompt, subset.caption_suffix)
                                              if p)) for s in samples]
    return samples, source, problems


def find_mask(mask_dir: Path, image: Path) -> Path | None:
    """The mask of ``image`` in ``mask_dir``: the same file name, else the same stem with any image extension."""
    same = mask_dir / image.name
    if same.is_file():
        return same
    return next((mask_dir / f"{image.stem}{ext}" for ext in IMAGE_EXTENSIONS
                 if (mask_dir / f"{image.stem}{ext}").is_file()), None)


def epoch_entries(samples: list[CaptionedImage], subsets: list[Subset]) -> list[int]:
    """The sample indices of one epoch, as sd-scripts counts them: every training image ``num_repeats`` times;
    then regularisation images, each at first its own ``num_repeats`` times, one more round after another until
    they match the training count (images past that point are left out, the count may end a little above it
    when repeats are large, exactly as sd-scripts registers them)."""
    train = [i for i, s in enumerate(samples) if not subsets[s.subset].is_reg]
    reg = [i for i, s in enumerate(samples) if subsets[s.subset].is_reg]
    entries = [i for i in train for _ in range(subsets[samples[i].subset].num_repeats)]
    counts: dict[int, int] = {}
    total, first_round = 0, True
    while reg and total < len(entries):
        for i in reg:
            if first_round:
                counts[i] = subsets[samples[i].subset].num_repeats
                total += counts[i]
            else:
                counts[i] += 1
                total += 1
            if total >= len(entries):
                break
        first_round = False
    return entries + [i for i in reg for _ in range(counts.get(i, 0))]


def describe_epoch(samples: list[CaptionedImage], subsets: list[Subset], entries: list[int]) -> str:
    """``40 samples per epoch (10_a: 3 images x 10, 5_b: 2 images x 5)``, with regularisation counts."""
    images = [0] * len(subsets)
    drawn = [0] * len(subsets)
    for s in samples:
        images[s.subset] += 1
    for i in entries:
        drawn[samples[i].subset] += 1
    parts = []
    for k, subset in enumerate(subsets):
        if subset.is_reg:
            parts.append(f"{subset.name}: {images[k]} regularisation images, {drawn[k]} drawn")
        else:
            parts.append(f"{subset.name}: {images[k]} images x {subset.num_repeats}")
    reg = sum(d for d, s in zip(drawn, subsets) if s.is_reg)
    head = f"{len(entries)} samples per epoch" + (f" ({len(entries) - reg} training + {reg} regularisation)"
                                                   if reg else "")
    return f"{head}: {', '.join(parts)}" if len(subsets) > 1 or subsets[0].num_repeats > 1 else head
