"""Stable Diffusion 1.x / 2.x / SDXL LoRA through peft: the UNet (attention, optionally the 3x3 convs: LoCon) and,
with ``train_text_encoder``, the text encoders; the VAE is frozen.

Loss: MSE between the UNet output and the scheduler's target (``epsilon`` -> noise, ``v_prediction`` -> velocity),
per sample, at a uniformly drawn timestep. Every random draw for a sample (crop, flip, VAE sample, noise, timestep)
comes from that sample's own seed, so the result is independent of batch layout, process count and resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..export.kohya import model_family
from ..lora import effective_alpha, effective_conv_alpha, make_lora_config, make_unet_lora_config
from .base import DataSummary, RunInfo, Task
from .image_data import ImageCaches, ImageCaptionDataset, build_caches, input_ids_key
from .sd_models import (SDXL, SDXL_RESOLUTION, TEXT_ENCODER_TARGETS, LoRANetwork, check_diffusers_model_path,
                        encode_prompt, family_of_folder, is_single_file, min_snr_weights)

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def adapter_metadata(lora_config: Any, cfg: Any) -> dict[str, Any]:
    """The LoraConfig fields diffusers' ``load_lora_weights`` rebuilds the adapter from, with rsLoRA folded into the
    classic alpha/rank scale (see :func:`effective_alpha`)."""
    meta = {"r": lora_config.r, "lora_alpha": effective_alpha(cfg), "lora_dropout": lora_config.lora_dropout,
            "target_modules": sorted(lora_config.target_modules), "use_dora": lora_config.use_dora}
    if lora_config.rank_pattern:
        meta["rank_pattern"] = dict(lora_config.rank_pattern)
        meta["alpha_pattern"] = {k: effective_conv_alpha(cfg) for k in lora_config.alpha_pattern}
    return meta


class ImageTask(Task):
    """LoRA on the UNet (and optionally the text encoders) of a Stable Diffusion 1.x / 2.x / SDXL model."""

    name = "image"
    family: str = "sd1"

    def check_base_model(self) -> None:
        from ..config import check_environment

        cfg = self.cfg
        check_environment(cfg)
        if cfg.target_modules == "all-linear":
            raise ConfigError("target_modules: all-linear is for the text task; list UNet module names instead")
        if cfg.network_weights is not None and not Path(cfg.network_weights).expanduser().exists():
            raise ConfigError(f"network_weights not found: '{cfg.network_weights}' (a kohya or diffusers .safetensors "
                              "LoRA, or a PEFT adapter folder)")
        if cfg.quantization is not None:
            raise ConfigError("quantization: 4-bit QLoRA is for the text task; remove it for task: image")
        if cfg.cache_latents and (cfg.random_crop or cfg.random_flip):
            raise ConfigError("cache_latents: cached latents cannot be re-cropped or flipped; turn off random_crop "
                              "and random_flip, or cache_latents")
        if cfg.cache_text_embeddings and cfg.shuffle_tags:
            raise ConfigError("cache_text_embeddings: shuffled tags make a new caption every time; turn off "
                              "shuffle_tags or cache_text_embeddings")
        if cfg.cache_text_embeddings and cfg.train_text_encoder:
            raise ConfigError("cache_text_embeddings: a trained text encoder changes its embeddings every step; turn "
                              "off cache_text_embeddings or train_text_encoder")
        if is_single_file(cfg.base_model):
            from ..models.single_file import check_single_file

            self._set_family(check_single_file(cfg.base_model, cfg.base_model_config))
            return
        if cfg.base_model_config is not None:
            raise ConfigError("base_model_config: only for a single-file base_model (.safetensors/.ckpt); a diffusers "
                              "folder or hub id has its own configs, remove base_model_config")
        folder = check_diffusers_model_path(cfg.base_model)
        if folder is not None:
            self._set_family(family_of_folder(folder))

    def _set_family(self, family: str) -> None:
        """Record the model family; an unset ``resolution`` becomes the family's native size (1024 for SDXL)."""
        self.family = family
        if family == SDXL and "resolution" not in self.cfg.model_fields_set:
            self.cfg.resolution = SDXL_RESOLUTION

    def data_report(self):
        """The full data check (no model loaded; the tokenizer only, when it is a local folder, to count tokens)."""
        from ..data.check import check_images

        cfg = self.cfg
        tokenizer = None
        local = Path(cfg.base_model).expanduser() / "tokenizer"
        if is_single_file(cfg.base_model):
            from ..models.single_file import load_single_file_tokenizers

            tokenizer = load_single_file_tokenizers(cfg.base_model, cfg.base_model_config)["tokenizer"]
        elif (local / "vocab.json").is_file():
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(local)
        return check_images(cfg.train_data_dir, cfg.metadata_path, cfg.resolution, cfg.caption_source,
                            max_caption_tokens=tokenizer.model_max_length if tokenizer else None, tokenizer=tokenizer)

    def check_data(self) -> DataSummary:
        import os

        from ..data.images import raise_for_errors

        report = self.data_report()
        raise_for_errors(report)
        if os.environ.get("RANK", "0") == "0":
            for finding in report.warnings:
                print(f"warning: {finding.message}")
        self._samples = report.samples
        self._hashes = report.hashes
        self._sizes = report.sizes
        self._caches: ImageCaches | None = None
        self._buckets = None
        if self.cfg.bucket:
            from ..data.buckets import assign_bucket, make_buckets

            buckets = make_buckets(self.cfg.resolution, self.cfg.bucket_step)
            self._buckets = [assign_bucket(w, h, buckets, self.cfg.bucket_step, self.cfg.bucket_no_upscale)
                             for w, h in report.sizes]
        return DataSummary(
            num_samples=report.num_samples,
            dataset_hash=report.dataset_hash,
            description=f"{report.num_samples} captioned images from {report.source}"
            + (f" in {len(set(self._buckets))} buckets" if self._buckets else ""),
        )

    # --- model ---------------------------------------------------------------------------------------------------
    def _load_components(self) -> dict[str, Any]:
        """unet, vae, scheduler, text_encoders, tokenizers of the base model (weights loaded, on the CPU)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        base = self.cfg.base_model
        if is_single_file(base):
            from ..models.single_file import load_single_file

            parts = load_single_file(base, self.cfg.base_model_config)
            names = ["", "_2"] if parts["family"] == SDXL else [""]
            return dict(
                family=parts["family"], unet=parts["unet"], vae=parts["vae"],
                scheduler=DDPMScheduler.from_config(parts["scheduler"].config),
                text_encoders=[parts[f"text_encoder{n}"] for n in names],
                tokenizers=[parts[f"tokenizer{n}"] for n in names],
            )
        try:
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
            family = model_family(dict(unet.config))
            encoders = [("text_encoder", CLIPTextModel)]
            if family == SDXL:
                encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
            return dict(
                family=family,
                unet=unet,
                vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
                scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
                text_encoders=[cls.from_pretrained(base, subfolder=name) for name, cls in encoders],
                tokenizers=[CLIPTokenizer.from_pretrained(base, subfolder=name.replace("text_encoder", "tokenizer"))
                            for name, _ in encoders],
            )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"base_model: could not load '{base}': {first}") from None

    def _attach_lora(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module]) -> LoRANetwork:
        """Add the LoRA adapters and gather the trained modules into one :class:`LoRANetwork`."""
        cfg = self.cfg
        unet.add_adapter(make_unet_lora_config(cfg, cfg.target_modules or DEFAULT_TARGET_MODULES))
        trained = []
        if cfg.train_text_encoder:
            for encoder in text_encoders:
                encoder.add_adapter(make_lora_config(cfg, TEXT_ENCODER_TARGETS))
                trained.append(encoder)
        return LoRANetwork(unet, trained, self.family)

    def load_model(self, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
        parts = self._load_components()
        self._set_family(parts["family"])
        self.vae, self.noise_scheduler = parts["vae"], parts["scheduler"]
        self.text_encoders, self.tokenizers = parts["text_encoders"], parts["tokenizers"]
        unet = parts["unet"]
        for module in (*self.text_encoders, self.vae, unet):
            module.requires_grad_(False)
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
            module.eval()
        self.device = device

        network = self._attach_lora(unet, self.text_encoders)
        if self.cfg.network_weights is not None:  # incremental training: start from an existing LoRA
            from ..export.load import apply_network_weights

            apply_network_weights(self.cfg.network_weights, self.lora_modules(network), family=self.family)
        # Trainable LoRA tensors stay in fp32 even when the frozen base runs in half precision.
        for param in network.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if not any(p.requires_grad for p in unet.parameters()):
            raise ConfigError(f"target_modules: {self.cfg.target_modules} matched no UNet layer")
        if self.cfg.train_text_encoder:
            for encoder in self.text_encoders:
                encoder.train()  # dropout in the LoRA branch (CLIP's own dropout is 0)
        self.network = network
        if self.cfg.cache_latents or self.cfg.cache_text_embeddings:
            self._caches = build_caches(self.cfg, self._samples, self._hashes, self._buckets, self.vae, self.text_encoders,
                                       self.tokenizers, self.family, device)
        return network

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """UNet LoRA at learning_rate; text-encoder LoRA at text_encoder_lr."""
        groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad]}]
        te_params = [p for p in model.text_encoders.parameters() if p.requires_grad]
        if te_params:
            groups.append({"params": te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def memory_probe(self) -> tuple[list[torch.nn.Module], torch.nn.Module, Any]:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cfg, base = self.cfg, self.cfg.base_model
        try:
            if is_single_file(base):
                from ..models.single_file import load_single_file_configs

                configs = load_single_file_configs(base, cfg.base_model_config)
                unet_config, vae_config = configs["unet"], configs["vae"]
                te_configs = [configs[n] for n in ("text_encoder", "text_encoder_2") if n in configs]
                self.noise_scheduler = DDPMScheduler.from_config(configs["scheduler"])
            else:
                unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")
                vae_config = AutoencoderKL.load_config(base, subfolder="vae")
                names = ["text_encoder", "text_encoder_2"] if model_family(dict(unet_config)) == SDXL else [
                    "text_encoder"]
                te_configs = [CLIPTextConfig.from_pretrained(base, subfolder=name) for name in names]
                self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"base_model: could not read the configs of '{base}': {str(exc).splitlines()[0]}") from None
        family = model_family(dict(unet_config))
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(vae_config)
            text_encoders = [CLIPTextModel(te_configs[0])]
            if family == SDXL:
                text_encoders.append(CLIPTextModelWithProjection(te_configs[1]))
        self._set_family(family)
        for module in (unet, vae, *text_encoders):
            module.requires_grad_(False)
        network = self._attach_lora(unet, text_encoders)
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing(network)
        self.vae, self.text_encoders, self.device, self.network = vae, text_encoders, torch.device("cpu"), network
        tokens = te_configs[0].max_position_embeddings
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        side = cfg.resolution  # buckets keep the area of resolution², which is what memory follows

        def make_batch(batch_size: int) -> dict[str, Any]:
            batch: dict[str, Any] = {"seeds": list(range(batch_size))}
            if cfg.cache_latents:
                shape = (batch_size, vae.config.latent_channels, side // factor, side // factor)
                batch["latent_mean"], batch["latent_std"] = torch.zeros(shape), torch.ones(shape)
            else:
                batch["pixels"] = torch.zeros(batch_size, 3, side, side)
            if cfg.cache_text_embeddings:
                batch["hidden"] = torch.zeros(batch_size, tokens, sum(c.hidden_size for c in te_configs))
                if family == SDXL:
                    batch["pooled"] = torch.zeros(batch_size, te_configs[-1].projection_dim)
            else:
                for i in range(len(te_configs)):
                    batch[input_ids_key(i)] = torch.zeros(batch_size, tokens, dtype=torch.long)
            if family == SDXL:
                batch["time_ids"] = torch.full((batch_size, 6), float(side))
            return batch

        return [unet, vae, *text_encoders], network, make_batch

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        model.unet.enable_gradient_checkpointing()
        for encoder in model.text_encoders:
            encoder.gradient_checkpointing_enable()

    def dataset(self, summary: DataSummary) -> Dataset:
        return ImageCaptionDataset(self._samples, self.tokenizers, self.cfg, self.family, self._buckets, self._caches,
                                   self._sizes)

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> np.ndarray | None:
        if self._buckets is None:
            return None
        from ..data.buckets import bucketed_order

        return bucketed_order(self._buckets, global_batch, np.random.default_rng([seed, epoch]))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {k: torch.stack([item[k] for item in items]) for k in items[0] if k != "seed"}
        batch["seeds"] = [item["seed"] for item in items]
        return batch

    def loss_count(self, batch: dict[str, Any]) -> int:
        return len(batch["seeds"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device, vae = self.device, self.vae
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["seeds"]]
        input_ids = [batch[input_ids_key(i)].to(device) for i in range(len(self.text_encoders))
                     if input_ids_key(i) in batch]
        conditioning: dict[str, Any] = {}
        with torch.no_grad():
            if "latent_mean" in batch:  # from the latent cache
                mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            else:
                dist = vae.encode(batch["pixels"].to(device, dtype=vae.dtype)).latent_dist
                mean, std = dist.mean, dist.std
            shape = mean.shape[1:]
            eps = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, mean.dtype)
            latents = mean + std * eps
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * vae.config.scaling_factor).float()
            if "hidden" in batch:  # from the text-embedding cache
                conditioning["hidden"] = batch["hidden"].to(device)
                conditioning["pooled"] = batch["pooled"].to(device) if "pooled" in batch else None
            elif not self.cfg.train_text_encoder:
                conditioning["hidden"], conditioning["pooled"] = encode_prompt(self.text_encoders, input_ids, self.family)
        if self.cfg.train_text_encoder:  # encoded inside the network, with gradients
            conditioning["input_ids"] = input_ids
        if "time_ids" in batch:
            conditioning["time_ids"] = batch["time_ids"].to(device)

        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]).to(device)
        if self.cfg.noise_offset:  # drawn last, so turning it on changes no other draw
            offsets = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in generators]).to(device)
            noise = noise + self.cfg.noise_offset * offsets
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"base_model: scheduler prediction_type '{prediction_type}' is not supported")
        pred = model(noisy, timesteps, **conditioning)
        per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(self.noise_scheduler, timesteps, self.cfg.min_snr_gamma)
        return per_sample.sum()

    def _pipeline(self, model: torch.nn.Module):
        """An inference pipeline over the frozen components and the LoRA-carrying modules (nothing reloaded)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        if self.family == SDXL:
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=model.unet, scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def generate_samples(self, model: torch.nn.Module) -> list[tuple[str, Any]]:
        """Render the sample prompts with the frozen components and the LoRA-carrying modules."""
        pipe = self._pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        trained = [e for e in self.text_encoders if e.training]
        for encoder in trained:
            encoder.eval()
        out = []
        try:
            for sample in self.cfg.sample_prompts:
                generator = torch.Generator(device=self.device).manual_seed(sample.seed)
                image = pipe(
                    sample.prompt, negative_prompt=sample.negative_prompt or None,
                    width=sample.width or self.cfg.resolution, height=sample.height or self.cfg.resolution,
                    num_inference_steps=sample.steps, guidance_scale=sample.guidance_scale, generator=generator,
                ).images[0]
                out.append((f"{sample.prompt} (seed {sample.seed})", image))
        finally:
            for encoder in trained:
                encoder.train()
        return out

    # --- export --------------------------------------------------------------------------------------------------
    def lora_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The LoRA-carrying modules by part name: ``unet``, and ``text_encoder`` / ``text_encoder_2`` when trained."""
        modules = {"unet": model.unet}
        for i, encoder in enumerate(model.text_encoders):
            modules["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
        return modules

    def lora_parts(self, model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT state dicts of the trained modules: ``unet``, and ``text_encoder`` / ``text_encoder_2``."""
        from peft.utils import get_peft_model_state_dict

        def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(module).items()}

        return {name: state(module) for name, module in self.lora_modules(model).items()}

    def export(self, model: torch.nn.Module, output_dir: Path, run: RunInfo) -> list[Path]:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        from ..export.kohya import (base_model_version, kohya_metadata, kohya_network_args, kohya_state_dict,
                                    write_kohya_lora)

        cfg = self.cfg
        alpha = effective_alpha(cfg)
        parts = self.lora_parts(model)
        v_prediction = self.noise_scheduler.config.prediction_type == "v_prediction"
        te_lr = (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else 0
        meta = kohya_metadata(
            network_dim=cfg.lora_rank,
            network_alpha=alpha,
            base_model_version=base_model_version(self.family, v_prediction),
            network_args=kohya_network_args(conv_rank=cfg.conv_rank, conv_alpha=effective_conv_alpha(cfg),
                                            use_dora=cfg.use_dora),
            base_model=cfg.base_model,
            output_name=cfg.output_name,
            num_train_images=run.num_samples,
            training_started_at=run.started_at,
            training_finished_at=run.finished_at,
            steps=run.steps,
            epoch=run.epoch,
            extra={
                "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
                "ss_learning_rate": str(cfg.learning_rate),
                "ss_unet_lr": str(cfg.learning_rate),
                "ss_text_encoder_lr": str(te_lr),
                "ss_network_train_unet_only": str(not cfg.train_text_encoder),
                "ss_network_dropout": str(cfg.lora_dropout),
                "ss_lr_scheduler": cfg.lr_scheduler,
                "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
                "ss_mixed_precision": cfg.mixed_precision,
                "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
                "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
                "ss_max_grad_norm": str(cfg.max_grad_norm),
                "ss_seed": str(cfg.seed),
                "ss_num_epochs": str(cfg.epochs),
                "ss_batch_size_per_device": str(cfg.batch_size),
                "ss_prediction_type": self.noise_scheduler.config.prediction_type,
                **run.provenance(),
            },
        )
        tensors = kohya_state_dict(parts, family=self.family, alpha=alpha, conv_alpha=effective_conv_alpha(cfg),
                                   unet_config=model.unet.config)
        kohya_path = write_kohya_lora(output_dir / f"{cfg.output_name}.safetensors", tensors, meta)

        diffusers_dir = output_dir / "diffusers"
        layers: dict[str, Any] = {}
        for name, module in self.lora_modules(model).items():
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(parts[name])
            layers[f"{name}_lora_adapter_metadata"] = adapter_metadata(module.peft_config["default"], cfg)
        pipeline_cls = StableDiffusionXLPipeline if self.family == SDXL else StableDiffusionPipeline
        pipeline_cls.save_lora_weights(diffusers_dir, **layers)
        return [kohya_path, diffusers_dir / "pytorch_lora_weights.safetensors"]
