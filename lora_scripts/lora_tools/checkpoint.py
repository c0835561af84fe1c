"""``lora-scripts lora merge FILE… --into BASE``: LoRAs fused into an SD 1.x/2.x/SDXL model, written as one
single-file checkpoint in the LDM/SGM layout (what A1111 loads and diffusers' ``from_single_file`` reads).

Fused by hand, module by module (``W += ratio * dW``; DoRA: ``W' = m * (W + dW) / ||W + dW||`` per output channel,
as LyCORIS and peft compute it): diffusers' ``fuse_lora`` drops DoRA's kohya magnitudes and cannot read LoHa/LoKr.
The LDM layout comes from :mod:`lora_scripts.models.ldm`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .files import LoraFile, Module, read_lora
from .lowrank import module_delta


def load_model_parts(path: Path, what: str, config: Path | None = None,
                     with_vae: bool = False) -> tuple[dict[str, torch.nn.Module], str]:
    """The UNet and CLIP text encoder(s) (and with ``with_vae`` the VAE) of an SD 1.x/2.x/SDXL model, by part name,
    and its family: ``path`` is a diffusers folder or a single-file checkpoint (``config``: its base_model_config)."""
    from ..export.kohya import model_family

    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what}: '{path}' not found; give a diffusers model folder or a single-file checkpoint")
    if path.is_file():
        from ..models.single_file import load_single_file

        components = load_single_file(path, config)
        names = ["unet", "text_encoder", "text_encoder_2"] + (["vae"] if with_vae else [])
        return {n: components[n] for n in names if n in components}, components["family"]
    if not (path / "unet" / "config.json").is_file():
        raise ConfigError(f"{what}: '{path}' is not a diffusers SD 1.x/2.x/SDXL folder (no unet/config.json)")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel.from_pretrained(path / "unet")}
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if (path / name / "config.json").is_file():
            parts[name] = cls.from_pretrained(path / name)
    if with_vae:
        parts["vae"] = AutoencoderKL.from_pretrained(path / "vae")
    return parts, model_family(parts["unet"].config)


def kohya_lookup(parts: Mapping[str, torch.nn.Module], family: str) -> dict[str, tuple[str, str]]:
    """Every kohya spelling (sd-scripts', diffusers-path, LDM-path; text encoders with or without ``text_model_``)
    of every Linear/Conv2d module of ``parts`` -> (part, module path)."""
    from ..export.load import kohya_spellings

    names: dict[str, tuple[str, str]] = {}
    for part, root in parts.items():
        if part == "vae":
            continue
        config: Any = getattr(root, "config", None)
        for path, layer in root.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            for spelling in kohya_spellings(part, path, family, config):
                names.setdefault(spelling, (part, path))
    return names


def apply_modules(parts: Mapping[str, torch.nn.Module], lora: LoraFile, ratio: float,
                  lookup: Mapping[str, tuple[str, str]], progress: Callable[..., Any]) -> int:
    """Fuse every module of ``lora`` at ``ratio`` into ``parts``' weights; returns how many were fused."""
    missing = sorted(name for name in lora.modules if name not in lookup)
    if missing:
        raise ConfigError(f"merge: '{lora.path}' adapts {len(missing)} modules the base model does not have (e.g. "
                          f"{', '.join(missing[:3])}); is the LoRA for this model family?")
    for name, module in progress(sorted(lora.modules.items()), desc=f"fuse {lora.path.name}", unit="module"):
        part, path = lookup[name]
        layer = parts[part].get_submodule(path)
        fuse_module(layer, module, ratio, name)
    return len(lora.modules)


@torch.no_grad()
def fuse_module(layer: torch.nn.Module, module: Module, ratio: float, name: str) -> None:
    """``layer.weight`` += ``ratio`` * the module's update (DoRA: renormalised to its magnitudes)."""
    weight = layer.weight
    delta = module_delta(module).double()
    if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
        raise ConfigError(f"merge: {name} has an update of shape {tuple(delta.shape)} but the base module's weight "
                          f"is {tuple(weight.shape)}; the LoRA is for another model")
    original = weight.double()
    merged = original + delta.reshape(weight.shape)
    magnitude = module.tensors.get("dora_scale")
    if magnitude is not None:
        if magnitude.numel() != weight.shape[0]:
            raise ConfigError(f"merge: {name}.dora_scale has shape {tuple(magnitude.shape)}: DoRA on the input axis "
                              "is not supported, only per output channel")
        norm = merged.reshape(weight.shape[0], -1).norm(dim=1)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        merged = merged * (magnitude.double().reshape(shape) / norm.reshape(shape))
        merged = original + ratio * (merged - original)
    else:
        merged = original + ratio * delta.reshape(weight.shape)
    weight.copy_(merged.to(weight.dtype))


def ldm_checkpoint_state(parts: Mapping[str, torch.nn.Module], family: str) -> dict[str, torch.Tensor]:
    """The single-file (LDM/SGM) state dict of an SD 1.x/2.x/SDXL model's UNet, VAE and text encoders."""
    from ..models.ldm import (clip_state_dict_to_ldm, open_clip_state_dict_to_ldm, unet_state_dict_to_ldm,
                              vae_state_dict_to_ldm)

    unet, vae = parts["unet"], parts["vae"]
    state = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
    state.update(vae_state_dict_to_ldm(vae.state_dict(), vae.config))
    text = parts["text_encoder"].state_dict()
    if family == "sd1":
        state.update(clip_state_dict_to_ldm(text, "cond_stage_model.transformer."))
    elif family == "sd2":
        state.update(open_clip_state_dict_to_ldm(text, "cond_stage_model.model."))
    else:
        state.update(clip_state_dict_to_ldm(text, "conditioner.embedders.0.transformer."))
        state.update(open_clip_state_dict_to_ldm(parts["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    return {key: value.detach().contiguous() for key, value in state.items()}


def merge_into_base(paths: Sequence[Path], ratios: Sequence[float], base: Path, output: Path,
                    base_config: Path | None = None, progress: Callable[..., Any] | None = None) -> Path:
    """Fuse the LoRAs at ``paths`` (at ``ratios``) into ``base`` and write ``output`` (``.safetensors``)."""
    from safetensors.torch import save

    from ..train.checkpoint import atomic_write_bytes

    progress = progress or (lambda items, **_: items)
    if Path(output).suffix != ".safetensors":
        raise ConfigError(f"--output: '{output}' should end in .safetensors (a single-file checkpoint)")
    loras = [read_lora(p) for p in paths]
    parts, family = load_model_parts(base, "--into", base_config, with_vae=True)
    for lora in loras:
        if lora.family and lora.family != family:
            raise ConfigError(f"merge: '{lora.path}' is a {lora.family} LoRA but --into '{base}' is {family}; use a "
                              f"{family} LoRA or base")
    lookup = kohya_lookup(parts, family)
    for lora, ratio in zip(loras, ratios):
        apply_modules(parts, lora, ratio, lookup, progress)
    state = ldm_checkpoint_state(parts, family)
    meta = {"lora_scripts_merged": json.dumps([{"file": Path(p).name, "ratio": r} for p, r in zip(paths, ratios)]),
            "lora_scripts_model_family": family, "format": "pt"}
    atomic_write_bytes(Path(output), save(state, metadata=meta))
    return Path(output)
