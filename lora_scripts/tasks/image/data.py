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

from ...data.images import CaptionedImage, augment_caption, center_crop, load_image, load_image_tensor
from ..base import SampleKey
from .families import Family


class ImageCaptionDataset(Dataset):
    """Captioned images as (pixels in [-1, 1] or cached latents, token ids or cached embeddings, the family's size
    conditioning, per-sample seed)."""

    def __init__(self, samples: list[CaptionedImage], tokenizers: list[Any], cfg: Any, family: Family,
                 buckets: list[tuple[int, int]] | None = None, caches: "ImageCaches | None" = None,
                 sizes: list[tuple[int, int]] | None = None, augment: bool = True):
        self.samples = samples
        self.buckets = buckets  # (width, height) per sample when bucketing
        self.caches = caches
        self.sizes = sizes  # original (width, height) per sample
        self.tokenizers = tokenizers
        self.family = family
        self.resolution = cfg.resolution
        self.random_crop = cfg.random_crop and augment
        self.random_flip = cfg.random_flip and augment
        self.caption_options = dict(shuffle_tags=cfg.shuffle_tags and augment, keep_tokens=cfg.keep_tokens,
                                    trigger_word=cfg.trigger_word, caption_dropout=cfg.caption_dropout if augment else 0.0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key
        sample = self.samples[index]
        rng = np.random.default_rng(seed)
        size = self.buckets[index] if self.buckets else self.resolution
        item: dict[str, Any] = {"seed": seed}
        caches = self.caches
        if caches is not None and caches.latent_keys:
            entry = caches.latents.get(caches.latent_keys[index])
            item["latent_mean"], item["latent_std"] = entry["mean"], entry["std"]
            crop = center_crop(*self.sizes[index], size)
        else:
            pixels, crop = load_image(sample.path, size, rng, self.random_crop, self.random_flip)
            item["pixels"] = torch.from_numpy(pixels)
        width, height = (size, size) if isinstance(size, int) else size
        item.update(self.family.size_conditioning(crop, (height, width)))
        prompt = augment_caption(sample.prompt, rng, **self.caption_options)
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
                 vae: Any, text_encoders: list[Any], tokenizers: list[Any], family: Family, device: torch.device
                 ) -> ImageCaches:
    """Fill the caches for every sample (only missing entries are computed); each process fills what it lacks
    and writes are atomic, so concurrent processes cannot corrupt an entry."""
    from tqdm.auto import tqdm

    from ...data.cache import TensorCache, entry_key, module_fingerprint

    root = Path(cfg.cache_dir) if cfg.cache_dir else cfg.output_dir / "cache"
    caches = ImageCaches()
    show = os.environ.get("RANK", "0") == "0"
    if cfg.cache_latents:
        vae_id = module_fingerprint(vae)
        caches.latents = TensorCache(root / "latents")
        sizes = buckets or [(cfg.resolution, cfg.resolution)] * len(samples)
        caches.latent_keys = [entry_key("latent", h, f"{w}x{hh}", vae_id) for h, (w, hh) in zip(hashes, sizes)]
        todo = [i for i, key in enumerate(caches.latent_keys) if not caches.latents.has(key)]
        for i in tqdm(todo, desc="cache latents", unit="img", disable=not show or not todo):
            pixels = load_image_tensor(samples[i].path, sizes[i], np.random.default_rng(0))
            with torch.no_grad():
                mean, std = family.latent_distribution(vae, torch.from_numpy(pixels)[None].to(device))
            caches.latents.put(caches.latent_keys[i], {"mean": mean[0], "std": std[0]})
    if cfg.cache_text_embeddings:
        caches.text = TensorCache(root / "text")
        caches.text_fingerprint = family.name + "".join(module_fingerprint(e) for e in text_encoders) + "".join(
            str(family.max_tokens(t, i)) for i, t in enumerate(tokenizers))
        prompts = {augment_caption(s.prompt, np.random.default_rng(0), trigger_word=cfg.trigger_word)
                   for s in samples}
        if cfg.caption_dropout > 0:
            prompts.add("")
        todo = sorted(p for p in prompts if not caches.text.has(caches.text_key(p)))
        for prompt in tqdm(todo, desc="cache text embeddings", unit="caption", disable=not show or not todo):
            tokens = {k: v[None].to(device) for k, v in family.tokenize(tokenizers, prompt).items()}
            with torch.no_grad():
                encoded = family.encode_prompt(text_encoders, tokens)
            caches.text.put(caches.text_key(prompt), {k: v[0] for k, v in encoded.items()})
    return caches
