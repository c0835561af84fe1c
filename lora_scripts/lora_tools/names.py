"""kohya module names -> (diffusers part, dotted module path), from the modules a model really has.

The model is the one at ``--base`` (a diffusers folder or single-file checkpoint; its configs only, no weights) or,
without it, the family's full-size configs shipped in ``lora_scripts/models/configs`` (whose module names are a
superset of any smaller model's of that family). Built on the meta device: no weights are read or allocated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

_CONFIG_FOLDERS = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def family_config_folder(family: str, base: Path | None = None) -> Path:
    """The diffusers folder whose configs name the modules: ``base`` or the family's shipped configs."""
    if base is not None:
        if not (Path(base) / "unet" / "config.json").is_file():
            raise ConfigError(f"--base: '{base}' is not a diffusers SD 1.x/2.x/SDXL folder (no unet/config.json)")
        return Path(base)
    if family not in _CONFIG_FOLDERS:
        raise ConfigError(f"this LoRA is for {family or 'an unknown model family'}; the LoRA tools convert, merge and "
                          "extract SD 1.x/2.x/SDXL LoRAs (the training export already writes both layouts for the "
                          "transformer families)")
    return Path(__file__).resolve().parents[1] / "models" / "configs" / _CONFIG_FOLDERS[family]


def meta_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """The UNet and CLIP text encoder(s) of the diffusers folder ``folder``, on the meta device, by part name."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        parts: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))}
        for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / part / "config.json").is_file():
                parts[part] = cls(CLIPTextConfig.from_pretrained(folder / part))
    return parts


def module_names(family: str, base: Path | None = None) -> dict[str, tuple[str, str]]:
    """Every kohya spelling of every Linear/Conv2d module of the family's (or ``base``'s) UNet and text encoders
    -> (part, module path)."""
    from .checkpoint import kohya_lookup

    return kohya_lookup(meta_modules(family_config_folder(family, base)), family if family in _CONFIG_FOLDERS else "sd1")


def kohya_name(part: str, path: str, family: str, unet_config: Any = None) -> str:
    """The conventional kohya name of ``path`` in ``part`` (sd-scripts' spelling)."""
    from ..export.kohya import kohya_module_name

    return kohya_module_name(part, path, family=family if family in _CONFIG_FOLDERS else "sd1",
                             unet_config=unet_config)
