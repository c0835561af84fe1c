"""Writing an image LoRA: the single-file (kohya / A1111 / ComfyUI) layout the family names, and the diffusers
format its pipeline's ``load_lora_weights`` reads, both with kohya ``ss_*`` and ``modelspec.*`` metadata."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ...lora import effective_alpha, effective_conv_alpha
from ..base import RunInfo


def export_image_lora(task: Any, model: torch.nn.Module, output_dir: Path, run: RunInfo) -> list[Path]:
    """Write ``<output_name>.safetensors`` (the family's single-file layout) and ``diffusers/`` for ``task``'s run."""
    import diffusers
    from ...export.kohya import kohya_metadata, kohya_network_args, write_kohya_lora
    from .task import adapter_metadata

    cfg, family = task.cfg, task.family
    alpha = effective_alpha(cfg)
    parts = task.lora_parts(model)
    prediction_type = getattr(task.noise_scheduler.config, "prediction_type", None) or "flow_matching"
    te_lr = (cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else 0
    meta = kohya_metadata(
        network_dim=cfg.lora_rank,
        network_alpha=alpha,
        base_model_version=family.version_label(prediction_type),
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
            "ss_prediction_type": prediction_type,
            "lora_scripts_base_quantization": cfg.base_quantization,  # how the base was stored while training
            **modelspec_metadata(family, cfg, run),
            **run.provenance(),
        },
    )
    if cfg.network_type != "lora":  # LoHa / LoKr: the LyCORIS file only (diffusers' SD loaders cannot read them)
        from ...export.lycoris import adapter_scales, lycoris_network_args, lycoris_state_dict

        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps(lycoris_network_args(
            cfg.network_type, conv_rank=cfg.conv_rank, conv_alpha=effective_conv_alpha(cfg), factor=cfg.lokr_factor,
            decompose_both=cfg.lokr_decompose_both))
        tensors = lycoris_state_dict(parts, adapter_scales(task.lora_modules(model)), family=family.ldm_name,
                                     unet_config=model.denoiser.config)
        path = write_kohya_lora(output_dir / f"{cfg.output_name}.safetensors", tensors, meta)
        for warning in task.export_warnings():
            print(f"warning: {warning}", file=sys.stderr)
        return [path]
    tensors = family.kohya_tensors(parts, alpha=alpha, conv_alpha=effective_conv_alpha(cfg),
                                   denoiser_config=model.denoiser.config)
    kohya_path = write_kohya_lora(output_dir / f"{cfg.output_name}.safetensors", tensors, meta)

    diffusers_dir = output_dir / "diffusers"
    layers: dict[str, Any] = {}
    for name, module in task.lora_modules(model).items():
        layers[f"{name}_lora_layers"] = family.diffusers_lora_layers(name, parts[name])
        layers[f"{name}_lora_adapter_metadata"] = adapter_metadata(module.peft_config["default"], cfg)
    getattr(diffusers, family.pipeline_class).save_lora_weights(diffusers_dir, **layers)
    for warning in task.export_warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return [kohya_path, diffusers_dir / "pytorch_lora_weights.safetensors"]


def modelspec_metadata(family: Any, cfg: Any, run: RunInfo) -> dict[str, str]:
    """Stability AI's model spec 1.0 fields (``modelspec.*``) that name the family, as sd-scripts writes them."""
    import datetime

    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": str(cfg.output_name),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(run.finished_at, datetime.timezone.utc).isoformat(),
        "lora_scripts_model_family": family.name,
    }
