"""Stable Diffusion 1.x / 2.x LoRA: UNet attention LoRA through peft, VAE and text encoder frozen.

Loss: MSE between the UNet output and the scheduler's target (``epsilon`` -> noise, ``v_prediction`` -> velocity),
per sample, at a uniformly drawn timestep. Every random draw for a sample (crop, flip, VAE sample, noise, timestep)
comes from that sample's own seed, so the result is independent of batch layout, process count and resume.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.images import CaptionedImage, augment_caption, load_image_tensor
from ..errors import ConfigError
from .base import DataSummary, RunInfo, SampleKey, Task

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ImageCaptionDataset(Dataset):
    """Captioned images as (pixels in [-1, 1], token ids, per-sample seed)."""

    def __init__(self, samples: list[CaptionedImage], tokenizer: Any, cfg: Any, buckets: list[tuple[int, int]] | None = None):
        self.samples = samples
        self.buckets = buckets  # (width, height) per sample when bucketing
        self.tokenizer = tokenizer
        self.resolution = cfg.resolution
        self.random_crop = cfg.random_crop
        self.random_flip = cfg.random_flip
        self.caption_options = dict(shuffle_tags=cfg.shuffle_tags, keep_tokens=cfg.keep_tokens,
                                    trigger_word=cfg.trigger_word, caption_dropout=cfg.caption_dropout)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, seed = key
        sample = self.samples[index]
        rng = np.random.default_rng(seed)
        size = self.buckets[index] if self.buckets else self.resolution
        pixels = load_image_tensor(sample.path, size, rng, self.random_crop, self.random_flip)
        prompt = augment_caption(sample.prompt, rng, **self.caption_options)
        ids = self.tokenizer(
            prompt, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixels": torch.from_numpy(pixels), "input_ids": ids, "seed": seed}


def check_diffusers_model_path(base_model: str) -> Path | None:
    """Return the local folder for ``base_model``, None for a hub id, or raise ConfigError."""
    path = Path(base_model).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix in SINGLE_FILE_SUFFIXES:
                raise ConfigError(
                    f"base_model: '{base_model}' is a single-file checkpoint; this version loads diffusers-format "
                    "folders (with model_index.json) or hub ids. Convert it with diffusers' "
                    "StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR) and point base_model at DIR"
                )
            raise ConfigError(f"base_model: '{base_model}' is a file, not a diffusers model folder")
        if not (path / "unet" / "config.json").is_file():
            raise ConfigError(
                f"base_model: '{base_model}' is not a diffusers Stable Diffusion folder (no unet/config.json); "
                "expected the layout written by StableDiffusionPipeline.save_pretrained"
            )
        return path
    looks_like_path = base_model.startswith((".", "/", "~")) or "\\" in base_model or base_model.count("/") != 1
    if looks_like_path or base_model.endswith(SINGLE_FILE_SUFFIXES) or not HUB_ID_RE.match(base_model):
        raise ConfigError(f"base_model not found: '{base_model}' (no such folder, and not a hub id like org/name)")
    return None


class ImageTask(Task):
    """LoRA on the UNet of a Stable Diffusion 1.x / 2.x model."""

    name = "image"

    def check_base_model(self) -> None:
        if self.cfg.target_modules == "all-linear":
            raise ConfigError("target_modules: all-linear is for the text task; list UNet module names instead")
        if self.cfg.network_weights is not None:
            raise ConfigError("network_weights: continuing from an existing LoRA is supported for task: text only so far")
        check_diffusers_model_path(self.cfg.base_model)

    def data_report(self):
        """The full data check (no model loaded; the tokenizer only, when it is a local folder, to count tokens)."""
        from ..data.check import check_images

        tokenizer = None
        local = Path(self.cfg.base_model).expanduser() / "tokenizer"
        if (local / "vocab.json").is_file():
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(local)
        cfg = self.cfg
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

    def load_model(self, device: torch.device, weight_dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        base = self.cfg.base_model
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
            self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
            self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
            unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"base_model: could not load '{base}': {first}") from None

        for module in (self.text_encoder, self.vae, unet):
            module.requires_grad_(False)
            module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
        self.text_encoder.eval()
        self.vae.eval()
        self.device = device

        unet.add_adapter(
            LoraConfig(
                r=self.cfg.lora_rank,
                lora_alpha=self.cfg.alpha,
                lora_dropout=self.cfg.lora_dropout,
                init_lora_weights=True,
                target_modules=self.cfg.target_modules or DEFAULT_TARGET_MODULES,
            )
        )
        # Trainable LoRA tensors stay in fp32 even when the frozen base runs in half precision.
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if not any(p.requires_grad for p in unet.parameters()):
            raise ConfigError(f"target_modules: {self.cfg.target_modules} matched no UNet layer")
        self.unet = unet
        return unet

    def enable_gradient_checkpointing(self, model: torch.nn.Module) -> None:
        model.enable_gradient_checkpointing()

    def dataset(self, summary: DataSummary) -> Dataset:
        return ImageCaptionDataset(self._samples, self.tokenizer, self.cfg, self._buckets)

    def epoch_order(self, epoch: int, seed: int, global_batch: int) -> np.ndarray | None:
        if self._buckets is None:
            return None
        from ..data.buckets import bucketed_order

        return bucketed_order(self._buckets, global_batch, np.random.default_rng([seed, epoch]))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pixels": torch.stack([item["pixels"] for item in items]),
            "input_ids": torch.stack([item["input_ids"] for item in items]),
            "seeds": [item["seed"] for item in items],
        }

    def loss_count(self, batch: dict[str, Any]) -> int:
        return len(batch["seeds"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        device, vae = self.device, self.vae
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["seeds"]]
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(device, dtype=vae.dtype)).latent_dist
            shape = dist.mean.shape[1:]
            eps = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dist.mean.dtype)
            latents = dist.mean + dist.std * eps
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * vae.config.scaling_factor).float()
            hidden = self.text_encoder(batch["input_ids"].to(device))[0]

        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
        timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in generators]).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"base_model: scheduler prediction_type '{prediction_type}' is not supported")
        pred = model(noisy.to(self.unet.dtype), timesteps, hidden).sample
        per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return per_sample.sum()

    def generate_samples(self, model: torch.nn.Module) -> list[tuple[str, Any]]:
        """Render the sample prompts with the frozen components and the LoRA-carrying UNet (nothing reloaded)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=model,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        out = []
        for sample in self.cfg.sample_prompts:
            generator = torch.Generator(device=self.device).manual_seed(sample.seed)
            image = pipe(
                sample.prompt, negative_prompt=sample.negative_prompt or None, width=sample.width or self.cfg.resolution,
                height=sample.height or self.cfg.resolution, num_inference_steps=sample.steps,
                guidance_scale=sample.guidance_scale, generator=generator,
            ).images[0]
            out.append((f"{sample.prompt} (seed {sample.seed})", image))
        return out

    # --- export --------------------------------------------------------------------------------------------------
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v2 or sd_v2_v (v-prediction)."""
        v2 = self.text_encoder.config.hidden_size == 1024 or self.unet.config.cross_attention_dim == 1024
        version = "sd_v2" if v2 else "sd_v1"
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            version += "_v"
        return version

    def export(self, model: torch.nn.Module, output_dir: Path, run: RunInfo) -> list[Path]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from ..export.kohya import kohya_metadata, peft_to_kohya, write_kohya_lora

        cfg = self.cfg
        state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
        meta = kohya_metadata(
            network_dim=cfg.lora_rank,
            network_alpha=cfg.alpha,
            base_model_version=self.base_model_version(),
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
                "ss_text_encoder_lr": "0",
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
        kohya_path = write_kohya_lora(output_dir / f"{cfg.output_name}.safetensors", peft_to_kohya(state, "lora_unet", cfg.alpha), meta)

        diffusers_dir = output_dir / "diffusers"
        StableDiffusionPipeline.save_lora_weights(
            diffusers_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(state),
            unet_lora_adapter_metadata={
                "r": cfg.lora_rank,
                "lora_alpha": cfg.alpha,
                "target_modules": sorted(set(cfg.target_modules or DEFAULT_TARGET_MODULES)),
                "lora_dropout": cfg.lora_dropout,
            },
        )
        return [kohya_path, diffusers_dir / "pytorch_lora_weights.safetensors"]
