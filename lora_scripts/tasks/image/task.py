"""Image LoRA through peft on the denoiser of any model family (``families/``): the UNet of SD 1.x/2.x/SDXL or the
transformer of SD3, FLUX.1, Chroma, Qwen-Image, Z-Image; with ``train_text_encoder``, also the CLIP text encoders
where the family has them. The VAE and the large text encoders (T5, Qwen) stay frozen; with ``base_quantization``
the denoiser and those large encoders are stored quantised (``models/quantize.py``), CLIP and the VAE are not.

Loss: per-sample MSE between the denoiser's output and the family's objective's target (DDPM epsilon/v, or
flow-matching velocity), times the objective's per-sample weight. Every random draw for a sample (crop, flip, VAE
sample, noise, timestep) comes from that sample's own seed, so the result is independent of batch layout, process
count and resume.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ...errors import ConfigError
from ...lora import effective_alpha, effective_conv_alpha, make_image_adapter_config, make_unet_lora_config
from ...models.quantize import check_base_quantization, quantize_frozen, skip_quantized_in_ddp
from ...offload import BlockSwap, DevicePair, checkpoint_offloaded, enable_offloaded_checkpointing
from ..base import DataSummary, RunInfo, Task
from .data import ImageCaches, ImageCaptionDataset, build_caches
from .families import Family, detect_folder, family_class, resolve_family
from .families.base import CLIP_TARGETS, Components


def adapter_metadata(lora_config: Any, cfg: Any) -> dict[str, Any]:
    """The LoraConfig fields diffusers' ``load_lora_weights`` rebuilds the adapter from, with rsLoRA folded into the
    classic alpha/rank scale (see :func:`effective_alpha`)."""
    meta = {"r": lora_config.r, "lora_alpha": effective_alpha(cfg), "lora_dropout": lora_config.lora_dropout,
            "target_modules": sorted(lora_config.target_modules), "use_dora": lora_config.use_dora}
    if lora_config.rank_pattern:
        meta["rank_pattern"] = dict(lora_config.rank_pattern)
        meta["alpha_pattern"] = {k: effective_conv_alpha(cfg) for k in lora_config.alpha_pattern}
    return meta


class LoRANetwork(torch.nn.Module):
    """Every module that carries trainable LoRA, as one module: the denoiser (registered under the family's name,
    ``unet`` or ``transformer``) and, with ``train_text_encoder``, the text encoders. The loop wraps this one module
    for DDP, so text-encoder gradients are synchronised too; the prompt is encoded inside ``forward`` when the text
    encoders train."""

    def __init__(self, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module], family: Family,
                 all_encoders: list[torch.nn.Module] | None = None) -> None:
        super().__init__()
        self.denoiser_name = family.denoiser_name
        setattr(self, family.denoiser_name, denoiser)
        self.text_encoders = torch.nn.ModuleList(text_encoders)  # the trained ones
        self.family = family
        # every text encoder in the family's order; a plain list, so the frozen ones are never wrapped, saved or
        # given to the optimizer
        self.all_encoders = list(all_encoders if all_encoders is not None else text_encoders)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, *, tokens: dict[str, torch.Tensor] | None = None,
                **cond: torch.Tensor) -> torch.Tensor:
        if tokens is not None:  # trained text encoders: encode here, with gradients
            cond = {**cond, **self.family.encode_prompt(self.all_encoders, tokens)}
        return self.family.denoise(self.denoiser, noisy, timesteps, cond)


class ImageTask(Task):
    """LoRA on the denoiser (and optionally the CLIP text encoders) of an image model of any known family."""

    name = "image"
    family: Family | None = None
    block_swap: BlockSwap | None = None  # set by load_model when blocks_to_swap > 0

    # --- before any model is loaded ------------------------------------------------------------------------------
    def check_base_model(self) -> None:
        from ...config import check_environment

        cfg = self.cfg
        check_environment(cfg)
        if cfg.target_modules == "all-linear":
            raise ConfigError("target_modules: all-linear is for the text task; list the denoiser's module names")
        if cfg.network_weights is not None and not Path(cfg.network_weights).expanduser().exists():
            raise ConfigError(f"network_weights not found: '{cfg.network_weights}' (a kohya or diffusers .safetensors "
                              "LoRA, or a PEFT adapter folder)")
        check_base_quantization(cfg)
        if cfg.cache_latents and (cfg.random_crop or cfg.random_flip):
            raise ConfigError("cache_latents: cached latents cannot be re-cropped or flipped; turn off random_crop "
                              "and random_flip, or cache_latents")
        if cfg.cache_text_embeddings and (cfg.shuffle_tags or any(d.shuffle_tags for d in cfg.datasets or [])):
            raise ConfigError("cache_text_embeddings: shuffled tags make a new caption every time; turn off "
                              "shuffle_tags or cache_text_embeddings")
        if cfg.cache_text_embeddings and cfg.train_text_encoder:
            raise ConfigError("cache_text_embeddings: a trained text encoder changes its embeddings every step; turn "
                              "off cache_text_embeddings or train_text_encoder")
        family = resolve_family(cfg)
        if family is not None:
            self._set_family(family)

    def _set_family(self, family: Family) -> None:
        """Record the model family and check what depends on it; an unset ``resolution`` becomes the family's
        native size (1024 for SDXL and the transformer families)."""
        cfg = self.cfg
        self.family = family
        family.check_components()
        if "resolution" not in cfg.model_fields_set:
            cfg.resolution = family.native_resolution
        if cfg.train_text_encoder and not family.text_encoder_lora:
            raise ConfigError(f"train_text_encoder: {family.title}'s text encoder stays frozen here (T5 and Qwen "
                              "encoders are too large to adapt usefully); remove train_text_encoder")
        if cfg.network_type != "lora" and family.denoiser_name != "unet":
            raise ConfigError(f"network_type: {cfg.network_type} is exported in LyCORIS's kohya layout, which names UNet "
                              f"modules; {family.title}'s single-file layout fuses q/k/v, which a Hadamard or "
                              "Kronecker product cannot be split into; use network_type: lora")
        if cfg.fsdp and not family.swap_block_lists:
            raise ConfigError(f"fsdp: {family.title} has no chain of transformer blocks to shard, and its UNet fits "
                              "on one GPU; remove fsdp (several processes without it train with DDP)")
        if cfg.blocks_to_swap and not family.swap_block_lists:
            raise ConfigError(f"blocks_to_swap: {family.title} has no chain of transformer "
                              "blocks to swap (its down and up blocks are joined by skip connections) and fits on the "
                              "GPUs that train it; remove blocks_to_swap (gradient_checkpointing and mixed_precision: "
                              "bf16 save memory)")
        if cfg.conv_rank is not None and family.denoiser_name != "unet":
            raise ConfigError(f"conv_rank: LoCon adapts UNet convolutions; {family.title} is a transformer, remove "
                              "conv_rank")
        multiple = family.latent_downscale * family.image_patch
        if cfg.resolution % multiple or (cfg.bucket and cfg.bucket_step % multiple):
            raise ConfigError(f"resolution: {family.title} needs image sides in multiples of {multiple} "
                              f"(resolution {cfg.resolution}, bucket_step {cfg.bucket_step})")
        for i, spec in enumerate(cfg.datasets or []):
            if spec.resolution and spec.resolution % multiple:
                raise ConfigError(f"datasets.{i}.resolution: {family.title} needs image sides in multiples of "
                                  f"{multiple} (got {spec.resolution})")

    def data_report(self):
        """The full data check (no model loaded; the tokenizer only, when it is at hand, to count tokens)."""
        from ...data.check import check_subsets
        from ...data.subsets import subsets_from_config

        subsets, problems = subsets_from_config(self.cfg)
        tokenizer = self._caption_tokenizer()
        return check_subsets(subsets, problems, max_caption_tokens=tokenizer.model_max_length if tokenizer else None,
                             tokenizer=tokenizer)

    def _caption_tokenizer(self) -> Any:
        """The first (CLIP) tokenizer of an SD-family base model, if it can be had without loading weights."""
        cfg = self.cfg
        if self.family is None or self.family.denoiser_name != "unet":
            return None
        from .families import is_single_file

        if is_single_file(cfg.base_model):
            from ...models.single_file import load_single_file_tokenizers

            return load_single_file_tokenizers(cfg.base_model, cfg.base_model_config)["tokenizer"]
        local = Path(cfg.base_model).expanduser() / "tokenizer"
        if (local / "vocab.json").is_file():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(local)
        return None

    def check_data(self) -> DataSummary:
        from ...data.images import raise_for_errors

        cfg = self.cfg
        report = self.data_report()
        raise_for_errors(report)
        if os.environ.get("RANK", "0") == "0":
            for finding in report.warnings:
                print(f"warning: {finding.message}")
        samples, hashes, sizes = list(report.samples), list(report.hashes), list(report.sizes)
        subsets, entries = list(report.subsets), list(report.entries)
        self._val: tuple[list, list, list] | None = None
        if cfg.val_data is not None:
            from ...data.check import check_images

            # captions as for train_data_dir: its metadata.csv, else metadata.jsonl or sidecar files
            val = check_images(cfg.val_data, Path(cfg.val_data) / "metadata.csv", cfg.resolution, cfg.caption_source)
            raise_for_errors(val)
            self._val = (list(val.samples), list(val.sizes), None)
        elif cfg.val_size > 0:
            # held out from the training images (never the regularisation ones), with all their repeats
            candidates = [i for i, s in enumerate(samples) if not subsets[s.subset].is_reg]
            count = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(cfg.val_size * len(candidates)))
            if count >= len(candidates):
                raise ConfigError(f"val_size: {cfg.val_size} leaves no training images out of {len(candidates)} "
                                  "(lower val_size, or give val_data)")
            chosen = np.random.default_rng([cfg.seed, 7]).choice(len(candidates), count, replace=False).tolist()
            held = {candidates[i] for i in chosen}
            self._val = ([s for i, s in enumerate(samples) if i in held],
                         [z for i, z in enumerate(sizes) if i in held], subsets)
            keep = [i for i in range(len(samples)) if i not in held]
            renumber = {old: new for new, old in enumerate(keep)}
            samples, hashes, sizes = [samples[i] for i in keep], [hashes[i] for i in keep], [sizes[i] for i in keep]
            entries = [renumber[i] for i in entries if i not in held]
        self._samples, self._hashes, self._sizes = samples, hashes, sizes
        self._subsets, self._entries = subsets, entries
        self._caches: ImageCaches | None = None
        self._buckets = None
        if cfg.bucket:
            from ...data.buckets import assign_bucket, make_buckets

            grids = {r: make_buckets(r, cfg.bucket_step) for r in {s.resolution for s in subsets}}
            self._buckets = [assign_bucket(w, h, grids[subsets[s.subset].resolution], cfg.bucket_step,
                                           cfg.bucket_no_upscale) for s, (w, h) in zip(samples, sizes)]
        elif len({s.resolution for s in subsets}) > 1:  # square sizes per subset: batches must not mix them
            self._buckets = [(subsets[s.subset].resolution,) * 2 for s in samples]
        import hashlib

        dataset_hash = report.dataset_hash
        if self._val is not None and cfg.val_data is None:  # the split is part of what was trained on
            dataset_hash = hashlib.sha256(f"{dataset_hash}:val{cfg.val_size}:{cfg.seed}".encode()).hexdigest()
        from ...data.subsets import describe_epoch

        epoch = describe_epoch(samples, subsets, entries)
        return DataSummary(
            num_samples=len(entries),
            dataset_hash=dataset_hash,
            description=f"{len(samples)} captioned images from {report.source}"
            + (f" in {len(set(self._buckets))} buckets" if self._buckets else "")
            + (f"; {len(self._val[0])} validation images" if self._val else "")
            + (f"; {epoch}" if epoch and (len(entries) != len(samples) or len(subsets) > 1) else ""),
        )

    # --- model ---------------------------------------------------------------------------------------------------
    def _load_components(self, dtype: torch.dtype = torch.float32) -> Components:
        """Every component of the base model, weights loaded on the CPU in ``dtype``; the family is read from the
        weights of a hub id of a UNet model."""
        cfg = self.cfg
        if self.family is None:  # a hub id without model_family: SD 1.x/2.x/SDXL, told apart by the UNet config
            from diffusers import UNet2DConditionModel

            try:
                unet_config = UNet2DConditionModel.load_config(cfg.base_model, subfolder="unet")
            except (OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"base_model: could not load '{cfg.base_model}': {first} (for a model other than "
                                  "SD 1.x/2.x/SDXL set model_family)") from None
            from .families import UNET_FAMILIES

            self._set_family(next(c for c in UNET_FAMILIES if c.matches_unet_config(unet_config))(cfg))
        self.family.load_dtype = dtype
        return self.family.load(cfg.base_model)

    def _attach_lora(self, components: Components) -> LoRANetwork:
        """Add the LoRA adapters and gather the trained modules into one :class:`LoRANetwork`."""
        cfg, family = self.cfg, self.family
        denoiser = components.denoiser
        denoiser.add_adapter(make_unet_lora_config(cfg, family.lora_targets(denoiser)))
        trained = []
        for index, encoder in enumerate(components.text_encoders):
            if cfg.train_text_encoder and index in family.text_encoder_lora:
                encoder.add_adapter(make_image_adapter_config(cfg, CLIP_TARGETS))
                trained.append(encoder)
        return LoRANetwork(denoiser, trained, family, list(components.text_encoders))

    def load_model(self, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
        components = self._load_components(weight_dtype)
        family = self.family
        kind = self.cfg.base_quantization
        quantized = {id(m) for m in quantized_modules(components)} if kind != "none" else set()
        self.block_swap = self._block_swap(components.denoiser, device, weight_dtype)
        for module in (*components.text_encoders, components.vae, components.denoiser):
            module.requires_grad_(False)
            # swapped blocks stay on the CPU: the whole denoiser may not fit on the device
            held = self.block_swap.held_back(module) if self.block_swap and module is components.denoiser \
                else nullcontext()
            if id(module) in quantized:  # cast on the CPU, then quantised layer by layer onto the device
                if weight_dtype != torch.float32:
                    module.to(dtype=weight_dtype)
                with held:
                    quantize_frozen(module, kind, device, weight_dtype)
                if self.block_swap and module is components.denoiser:  # quantised where they will be kept
                    for block in self.block_swap.swapped:
                        quantize_frozen(block, kind, torch.device("cpu"), weight_dtype)
                module.eval()
                continue
            with held:
                module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
            module.eval()
        self.components, self.device = components, device
        self._objective = family.objective(components.scheduler)

        network = self._attach_lora(components)
        if self.cfg.network_weights is not None:  # incremental training: start from an existing LoRA
            family.apply_network_weights(self.cfg.network_weights, self.lora_modules(network))
        if self.block_swap is not None:  # after LoRA exists (DoRA reads the base weights when it is attached)
            self.block_swap.install()
        # Trainable LoRA tensors stay in fp32 even when the frozen base runs in half precision.
        for param in network.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if not any(p.requires_grad for p in network.denoiser.parameters()):
            raise ConfigError(f"target_modules: {self.cfg.target_modules} matched no layer of the "
                              f"{family.title} {family.denoiser_name}")
        for encoder in network.text_encoders:
            encoder.train()  # dropout in the LoRA branch (CLIP's own dropout is 0)
        skip_quantized_in_ddp(network)
        self.network = network
        if self.cfg.cache_latents or self.cfg.cache_text_embeddings:
            self._caches = build_caches(self.cfg, self._samples, self._hashes, self._buckets, components.vae,
                                        components.text_encoders, components.tokenizers, family, device,
                                        self._subsets)
            self._release_cached_encoders()
        return network

    def _block_swap(self, denoiser: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> BlockSwap | None:
        """``blocks_to_swap``: the swap of the family's last N blocks, or None."""
        count = self.cfg.blocks_to_swap
        if not count:
            return None
        blocks = self.family.swap_blocks(denoiser)
        if count > len(blocks):
            raise ConfigError(f"blocks_to_swap: {count} is more than the {len(blocks)} blocks of this "
                              f"{self.family.title} {self.family.denoiser_name}; use at most {len(blocks)}")
        return BlockSwap(blocks, count, DevicePair(device), dtype)

    def _release_cached_encoders(self) -> None:
        """Once every sample's latents / embeddings are cached, the VAE / text encoders are only needed for
        samples and validation; without those they are freed (T5-XXL and Qwen2.5-VL are several GB)."""
        cfg, components = self.cfg, self.components
        if cfg.sample_prompts or self._val is not None:
            return
        import gc

        if cfg.cache_text_embeddings and not cfg.train_text_encoder:
            components.text_encoders = [_Released(e) for e in components.text_encoders]
            self.network.all_encoders = []
        if cfg.cache_latents:
            components.vae = _Released(components.vae)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def vae(self) -> torch.nn.Module:
        return self.components.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.components.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.components.tokenizers

    @property
    def noise_scheduler(self) -> Any:
        return self.components.scheduler

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Denoiser LoRA at learning_rate; text-encoder LoRA at text_encoder_lr."""
        groups = [{"params": [p for p in model.denoiser.parameters() if p.requires_grad]}]
        te_params = [p for p in model.text_encoders.parameters() if p.requires_grad]
        if te_params:
            groups.append({"params": te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def memory_probe(self) -> tuple[list[torch.nn.Module], torch.nn.Module, Any]:
        cfg = self.cfg
        if self.family is None:
            from diffusers import UNet2DConditionModel

            try:
                unet_config = UNet2DConditionModel.load_config(cfg.base_model, subfolder="unet")
            except (OSError, ValueError) as exc:
                raise ConfigError(f"base_model: could not read the configs of '{cfg.base_model}': "
                                  f"{str(exc).splitlines()[0]}") from None
            from .families import UNET_FAMILIES

            self._set_family(next(c for c in UNET_FAMILIES if c.matches_unet_config(unet_config))(cfg))
        family = self.family
        components = family.meta_components(cfg.base_model)
        for module in (components.denoiser, components.vae, *components.text_encoders):
            module.requires_grad_(False).eval()  # as load_model leaves them (no T5 dropout masks)
        network = self._attach_lora(components)
        network.train()  # as the loop sets it
        if cfg.network_type != "lora":
            # peft's LoHa/LoKr draw `torch.rand(1) > module_dropout` in training mode, which fake tensors cannot
            # answer; with module_dropout 0 (ours) eval mode computes the same step
            from peft.tuners.lycoris_utils import LycorisLayer

            for module in network.modules():
                if isinstance(module, LycorisLayer):
                    module.eval()
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing(network)
        self.components, self.device, self.network = components, torch.device("cpu"), network
        self._objective = family.objective(components.scheduler)
        # buckets keep the area of resolution², which is what memory follows; the largest subset's is the worst case
        side = max([cfg.resolution] + [d.resolution for d in cfg.datasets or [] if d.resolution])

        def make_batch(batch_size: int) -> dict[str, Any]:
            batch: dict[str, Any] = {"seeds": list(range(batch_size))}
            if cfg.cache_latents:
                shape = (batch_size, *family.latent_shape(components.vae, side, side))
                batch["latent_mean"], batch["latent_std"] = torch.zeros(shape), torch.ones(shape)
            else:
                batch["pixels"] = torch.zeros(batch_size, 3, side, side)
            if cfg.cache_text_embeddings:
                batch.update(family.meta_conditioning(components, batch_size))
            else:
                batch.update(family.meta_tokens(components, batch_size))
            for key, value in family.size_conditioning(_SquareCrop(side), (side, side)).items():
                batch[key] = value.expand(batch_size, *value.shape).clone()
            return batch

        return [components.denoiser, components.vae, *components.text_encoders], network, make_batch

    def swap_blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return self.family.swap_blocks(model.denoiser)

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        offload = self.cfg.gradient_checkpointing == "offload"
        model.denoiser.enable_gradient_checkpointing(checkpoint_offloaded if offload else None)
        for encoder in model.text_encoders:
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            if offload:
                enable_offloaded_checkpointing(encoder)

    def dataset(self, summary: DataSummary) -> Dataset:
        return ImageCaptionDataset(self._samples, self.tokenizers, self.cfg, self.family, self._buckets, self._caches,
                                   self._sizes, subsets=self._subsets, entries=self._entries)

    def shard_classes(self, model: torch.nn.Module) -> list[str]:
        """The denoiser's transformer block classes (the blocks block swap swaps); the text encoders and VAE stay
        whole on every process (cache_text_embeddings frees them)."""
        return sorted({type(block).__name__ for block in self.family.swap_blocks(model.denoiser)})

    def validation_dataset(self) -> Dataset | None:
        """Held-out images (``val_size`` / ``val_data``) at the square resolution, not cached; the loop keys them
        with fixed seeds, so every evaluation sees the same noise and timesteps."""
        if self._val is None:
            return None
        samples, sizes, subsets = self._val
        if subsets is not None:  # every held-out image at the one square resolution, so any of them batch together
            from dataclasses import replace

            subsets = [replace(s, resolution=self.cfg.resolution) for s in subsets]
        return ImageCaptionDataset(samples, self.tokenizers, self.cfg, self.family, None, None, sizes, augment=False,
                                   subsets=subsets)

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> np.ndarray | None:
        if self._buckets is None:
            return None
        from ...data.buckets import bucketed_order

        return bucketed_order([self._buckets[i] for i in self._entries], global_batch,
                              np.random.default_rng([seed, epoch]))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "seed"}
        batch["seeds"] = [item["seed"] for item in items]
        return batch

    def loss_count(self, batch: dict[str, Any]) -> int:
        return len(batch["seeds"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device, family = self.device, self.family
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["seeds"]]
        tokens = {k: batch[k].to(device) for k in family.token_keys if k in batch}
        cond: dict[str, Any] = {k: batch[k].to(device) for k in family.size_keys if k in batch}
        with torch.no_grad():
            if "latent_mean" in batch:  # from the latent cache
                mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            else:
                mean, std = family.latent_distribution(self.vae, batch["pixels"].to(device))
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(device, mean.dtype)
            latents = family.normalize_latents(self.vae, mean + std * eps).float()
            if not tokens:  # from the text-embedding cache
                cond.update({k: v.to(device) for k, v in batch.items()
                             if k not in ("seeds", "latent_mean", "latent_std", "pixels", "mask", "loss_weight", *cond)})
            elif not self.cfg.train_text_encoder:
                cond.update(family.encode_prompt(self.text_encoders, tokens))
        drawn = family.noise(self._objective, latents, generators)
        if self.cfg.train_text_encoder:  # encoded inside the network, with gradients
            pred = model(drawn.noisy, drawn.timesteps, tokens=tokens, **cond)
        else:
            pred = model(drawn.noisy, drawn.timesteps, **cond)
        dims = tuple(range(1, pred.dim()))
        per_pixel = torch.nn.functional.mse_loss(pred.float(), drawn.target.float(), reduction="none")
        if "mask" in batch:  # masked loss: every family's prediction is in the unpacked (B, C, h, w) latent layout
            per_pixel = per_pixel * self._latent_mask(batch["mask"].to(device, per_pixel.dtype), per_pixel.shape[-2:])
        per_sample = per_pixel.mean(dim=dims)  # masked-out pixels count as zeros, as in sd-scripts
        if drawn.weights is not None:
            per_sample = per_sample * drawn.weights.to(per_sample.device)
        if "loss_weight" in batch:  # regularisation images: prior_loss_weight
            per_sample = per_sample * batch["loss_weight"].to(per_sample.device)
        return per_sample.sum()

    @staticmethod
    def _latent_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) pixel masks -> (B, 1, h, w) weights per latent pixel: the mean over each latent pixel's block
        of pixels (area interpolation, as sd-scripts resizes its masks); cached masks are on the grid already."""
        if tuple(mask.shape[-2:]) != tuple(grid):
            mask = torch.nn.functional.interpolate(mask[:, None], size=tuple(grid), mode="area")[:, 0]
        return mask[:, None]

    def generate_samples(self, model: torch.nn.Module) -> list[tuple[str, Any]]:
        """Render the sample prompts with the frozen components and the LoRA-carrying modules."""
        network = model
        pipe = self.family.pipeline(self.components, network.denoiser, network.all_encoders)
        pipe.set_progress_bar_config(disable=True)
        trained = [e for e in network.text_encoders if e.training]
        for encoder in trained:
            encoder.eval()
        out = []
        try:
            for sample in self.cfg.sample_prompts:
                generator = torch.Generator(device=self.device).manual_seed(sample.seed)
                image = pipe(
                    sample.prompt, width=sample.width or self.cfg.resolution,
                    height=sample.height or self.cfg.resolution, num_inference_steps=sample.steps,
                    generator=generator, **self.family.sample_kwargs(sample),
                ).images[0]
                out.append((f"{sample.prompt} (seed {sample.seed})", image))
        finally:
            for encoder in trained:
                encoder.train()
        return out

    # --- export --------------------------------------------------------------------------------------------------
    def lora_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The LoRA-carrying modules by part name: the denoiser's (``unet`` / ``transformer``), and
        ``text_encoder`` / ``text_encoder_2`` when trained."""
        modules = {self.family.denoiser_name: model.denoiser}
        trained = [i for i in self.family.text_encoder_lora] if self.cfg.train_text_encoder else []
        for index, encoder in zip(trained, model.text_encoders):
            modules[self.family.text_encoder_parts[index]] = encoder
        return modules

    def lora_parts(self, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT state dicts of the trained modules by part name."""
        from peft.utils import get_peft_model_state_dict

        def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(module).items()}

        return {name: state(module) for name, module in self.lora_modules(model).items()}

    def export_warnings(self) -> list[str]:
        from ...lora import image_export_warnings

        return image_export_warnings(self.cfg)

    def export(self, model: torch.nn.Module, output_dir: Path, run: RunInfo) -> list[Path]:
        from .export import export_image_lora

        return export_image_lora(self, model, output_dir, run)


def quantized_modules(components: Components) -> list[torch.nn.Module]:
    """What ``base_quantization`` stores quantised: the denoiser and the large text encoders (T5, Qwen: every one
    that is not CLIP). CLIP encoders (123 M / 695 M parameters) stay as they are: they are small next to the
    denoiser, and they are the ones ``train_text_encoder`` adapts."""
    encoders = [e for e in components.text_encoders if not type(e).__name__.startswith("CLIP")]
    return [components.denoiser, *encoders]


class _Released(torch.nn.Module):
    """What is left of a component freed after caching: its config (latent scaling reads the VAE's) and dtype."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.config, self.dtype = getattr(module, "config", None), getattr(module, "dtype", torch.float32)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this component was freed after every sample was cached")


class _SquareCrop:
    """A centre crop of a square image of ``side`` pixels (for the estimate's size conditioning)."""

    def __init__(self, side: int) -> None:
        self.original_hw, self.top_left = (side, side), (0, 0)


def family_of_folder(folder: Path) -> str:
    """The family name of a local diffusers folder."""
    return detect_folder(folder).name


__all__ = ["ImageTask", "LoRANetwork", "adapter_metadata", "family_class", "family_of_folder"]
