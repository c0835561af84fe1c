"""The image task's data side: the dataset of captioned images (or their cached latents and text embeddings) and the
caches themselves."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...data.images import CaptionedImage, augment_caption, center_crop, latent_mask, load_image_and_mask
from ...data.subsets import Subset, inherited_options
from ..base import SampleKey
from .families import Family


class ImageCaptionDataset(Dataset):
    """Captioned images as (pixels in [-1, 1] or cached latents, token ids or cached embeddings, the family's size
    conditioning, per-sample seed), and with regularisation subsets each sample's ``loss_weight``, with masked
    subsets its loss ``mask`` (at pixel size, or on the latent grid from the latent cache).

    Index ``i`` of an epoch is image ``entries[i]`` (see :func:`...data.subsets.epoch_entries`: an image appears
    once per repeat); each subset brings its own caption options and resolution."""

    def __init__(self, samples: list[CaptionedImage], tokenizers: list[Any], cfg: Any, family: Family,
                 buckets: list[tuple[int, int]] | None = None, caches: "ImageCaches | None" = None,
                 sizes: list[tuple[int, int]] | None = None, augment: bool = True,
                 subsets: list[Subset] | None = None, entries: list[int] | None = None):
        self.samples = samples
        self.buckets = buckets  # (width, height) per image when bucketing or when subsets differ in resolution
        self.caches = caches
        self.sizes = sizes  # original (width, height) per image
        self.tokenizers = tokenizers
        self.family = family
        self.subsets = subsets or [Subset(image_dir=Path("."), metadata_path=Path("."), name="", **inherited_options(cfg))]
        self.entries = entries if entries is not None else list(range(len(samples)))
        self.random_crop = cfg.random_crop and augment
        self.random_flip = cfg.random_flip and augment
        self.augment = augment
        self.prior_loss_weight = cfg.prior_loss_weight
        self.weighted = any(s.is_reg for s in self.subsets)
        self.masked = any(s.masked for s in self.subsets)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        entry, seed = key
        index = self.entries[entry]
        sample = self.samples[index]
        subset = self.subsets[sample.subset]
        rng = np.random.default_rng(seed)
        size = self.buckets[index] if self.buckets else subset.resolution
        item: dict[str, Any] = {"seed": seed}
        caches = self.caches
        mask = None
        if caches is not None and caches.latent_keys:
            entry_tensors = caches.latents.get(caches.latent_keys[index])
            item["latent_mean"], item["latent_std"] = entry_tensors["mean"], entry_tensors["std"]
            mask = entry_tensors.get("mask")
            crop = center_crop(*self.sizes[index], size)
        else:
            pixels, crop, pixel_mask = load_image_and_mask(
                sample.path, size, rng, self.random_crop, self.random_flip, mask_path=sample.mask,
                alpha_mask=subset.alpha_mask)
            item["pixels"] = torch.from_numpy(pixels)
            if pixel_mask is not None:  # at pixel size: the loss averages it onto the latent grid
                mask = torch.from_numpy(pixel_mask)
        width, height = (size, size) if isinstance(size, int) else size
        if self.masked:  # every sample of a masked dataset carries one, so batches stack
            grid = item["latent_mean"].shape[-2:] if "latent_mean" in item else (height, width)
            item["mask"] = mask if mask is not None else torch.ones(grid)
        if self.weighted:
            item["loss_weight"] = torch.tensor(self.prior_loss_weight if subset.is_reg else 1.0)
        item.update(self.family.size_conditioning(crop, (height, width)))
        prompt = augment_caption(sample.prompt, rng, **subset.caption_options(self.augment))
        if caches is not None and caches.text is not None:
            item.update(caches.text.get(caches.text_key(prompt)))
        else:
            item.update(self.family.tokenize(self.tokenizers, prompt))
        return item


@dataclass
class ImageCaches:
    """Where the cached latents and text embeddings of a run are, and each sample's key."""

    latents: Any = None
    latent_keys: list[str] = field(default_factory=list)
    text: Any = None
    text_fingerprint: str = ""
    _text_keys: dict[str, str] = field(default_factory=dict)  # prompt -> key: a sha256 per caption, once

    def text_key(self, prompt: str) -> str:
        key = self._text_keys.get(prompt)
        if key is None:
            from ...data.cache import entry_key

            key = self._text_keys[prompt] = entry_key("text", prompt, self.text_fingerprint)
        return key


def build_caches(cfg: Any, samples: list[CaptionedImage], hashes: list[str], buckets: list[tuple[int, int]] | None,
                 vae: Any, text_encoders: list[Any], tokenizers: list[Any], family: Family, device: torch.device,
                 subsets: list[Subset]) -> ImageCaches:
    """Fill the caches for every sample (only missing entries are computed); each process fills what it lacks
    and writes are atomic, so concurrent processes cannot corrupt an entry. A masked sample's latent entry also
    holds its mask on the latent grid."""
    import hashlib

    from tqdm.auto import tqdm

    from ...data.cache import TensorCache, entry_key, module_fingerprint

    root = Path(cfg.cache_dir) if cfg.cache_dir else cfg.output_dir / "cache"
    caches = ImageCaches()
    show = os.environ.get("RANK", "0") == "0"
    if cfg.cache_latents:
        vae_id = module_fingerprint(vae)
        caches.latents = TensorCache(root / "latents")
        sizes = buckets or [(subsets[s.subset].resolution,) * 2 for s in samples]
        keys = []
        for sample, content, (w, h) in zip(samples, hashes, sizes):
            parts = ["latent", content, f"{w}x{h}", vae_id]
            subset = subsets[sample.subset]
            if subset.masked:  # the mask is part of the entry: its file and whether alpha counts
                mask_id = hashlib.sha256(sample.mask.read_bytes()).hexdigest() if sample.mask else ""
                parts += ["mask", str(subset.alpha_mask), mask_id]
            keys.append(entry_key(*parts))
        caches.latent_keys = keys
        todo = [i for i, key in enumerate(caches.latent_keys) if not caches.latents.has(key)]
        for i in tqdm(todo, desc="cache latents", unit="img", disable=not show or not todo):
            subset = subsets[samples[i].subset]
            pixels, _, mask = load_image_and_mask(samples[i].path, sizes[i], np.random.default_rng(0),
                                                  mask_path=samples[i].mask, alpha_mask=subset.alpha_mask)
            with torch.no_grad():
                mean, std = family.latent_distribution(vae, torch.from_numpy(pixels)[None].to(device))
            tensors = {"mean": mean[0], "std": std[0]}
            if mask is not None:  # on the latent grid, as the loss would average it
                tensors["mask"] = torch.from_numpy(latent_mask(mask, pixels.shape[-1] // mean.shape[-1]))
            caches.latents.put(caches.latent_keys[i], tensors)
    if cfg.cache_text_embeddings:
        caches.text = TensorCache(root / "text")
        caches.text_fingerprint = family.name + "".join(module_fingerprint(e) for e in text_encoders) + "".join(
            str(family.max_tokens(t, i)) for i, t in enumerate(tokenizers))
        prompts = {augment_caption(s.prompt, np.random.default_rng(0), trigger_word=subsets[s.subset].trigger_word)
                   for s in samples}
        if any(s.caption_dropout > 0 for s in subsets):
            prompts.add("")
        todo = sorted(p for p in prompts if not caches.text.has(caches.text_key(p)))
        for prompt in tqdm(todo, desc="cache text embeddings", unit="caption", disable=not show or not todo):
            tokens = {k: v[None].to(device) for k, v in family.tokenize(tokenizers, prompt).items()}
            with torch.no_grad():
                encoded = family.encode_prompt(text_encoders, tokens)
            caches.text.put(caches.text_key(prompt), {k: v[0] for k, v in encoded.items()})
    return caches
