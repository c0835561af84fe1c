"""The image model families and how a base model is matched to one.

Detection, in order: ``model_family:`` in the config (checked against the files); a diffusers folder's
``model_index.json`` ``_class_name`` (the UNet families by their UNet config); a single file's tensor names; a hub id
needs ``model_family`` unless it is a Stable Diffusion UNet model (loaded and told apart after download).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ....errors import ConfigError
from .base import SINGLE_FILE_SUFFIXES, Components, Family, read_model_index
from .sd import SD1, SD2, UNetFamily, unet_config_of
from .sdxl import SDXL

# Flow-matching families first: their single files can carry an SD-like ``model.diffusion_model.`` prefix.
FAMILIES: list[type[Family]] = [SD1, SD2, SDXL]
UNET_FAMILIES: list[type[UNetFamily]] = [SDXL, SD2, SD1]


def _register_optional() -> None:
    """The transformer families (imported here so that one module per family is all a new family needs)."""
    import importlib

    for module in ("flux", "chroma", "sd3", "qwen_image", "z_image"):
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
            continue
        FAMILIES.insert(0, mod.FAMILY)


_register_optional()
NAMES = [cls.name for cls in FAMILIES]


def family_class(name: str) -> type[Family]:
    """The family called ``name``; ConfigError listing the known ones otherwise."""
    for cls in FAMILIES:
        if cls.name == name:
            return cls
    raise ConfigError(f"model_family: unknown family '{name}'; expected one of {', '.join(sorted(NAMES))}")


def is_single_file(base_model: str) -> bool:
    """A single-file checkpoint (rather than a diffusers folder or hub id)?"""
    return Path(base_model).expanduser().is_file() or base_model.endswith(SINGLE_FILE_SUFFIXES)


def detect_folder(folder: Path) -> type[Family]:
    """The family of a local diffusers folder, from ``model_index.json`` (UNet families: from ``unet/config.json``)."""
    unet = unet_config_of(folder)
    if unet is not None:
        return next(cls for cls in UNET_FAMILIES if cls.matches_unet_config(unet))
    index = read_model_index(folder)
    if index is None:
        raise ConfigError(f"base_model: '{folder}' is not a diffusers Stable Diffusion folder nor another diffusers model folder (no "
                          "unet/config.json or model_index.json); expected the layout save_pretrained writes, or a single-file checkpoint")
    for cls in FAMILIES:
        if cls.matches_model_index(index):
            return cls
    raise ConfigError(f"base_model: '{folder}' is a {index.get('_class_name')} model, which no image family here "
                      f"trains (known: {', '.join(NAMES)}); set model_family if it is one of them")


def detect_single_file(path: Path) -> type[Family]:
    """The family of a single file from its tensor names (the header only)."""
    from ....models.checkpoint_file import family_from_shapes, modern_clip_name, read_weight_shapes

    shapes = read_weight_shapes(path)
    for cls in FAMILIES:
        if not issubclass(cls, UNetFamily) and cls.matches_header(shapes):
            return cls
    return family_class(family_from_shapes({modern_clip_name(k): v for k, v in shapes.items()}, path))


def resolve_family(cfg: Any) -> Family | None:
    """The family of ``cfg.base_model`` (``cfg.model_family`` when set, checked against the files), or None for a
    hub id of a UNet model, whose family is read after loading. Cheap: reads configs and headers only."""
    from ...base import require_hub_id

    base = cfg.base_model
    wanted = family_class(cfg.model_family) if cfg.model_family else None
    path = Path(base).expanduser()
    if is_single_file(base):
        found = detect_single_file(path)
        if wanted is not None and wanted is not found:
            raise ConfigError(f"model_family: '{base}' holds {found.title} weights, not {wanted.title}; set "
                              f"model_family: {found.name} or remove model_family")
        family = found(cfg)
        family.check_single_file(path)
        return family
    if cfg.base_model_config is not None and not (wanted and not issubclass(wanted, UNetFamily)):
        raise ConfigError("base_model_config: only for a single-file base_model (.safetensors/.ckpt); a diffusers "
                          "folder or hub id has its own configs, remove base_model_config")
    if path.is_dir():
        found = detect_folder(path)
        if wanted is not None and wanted is not found:
            raise ConfigError(f"model_family: '{base}' is a {found.title} model, not {wanted.title}; set "
                              f"model_family: {found.name} or remove model_family")
        return found(cfg)
    require_hub_id(base)
    return wanted(cfg) if wanted is not None else None


__all__ = ["Components", "FAMILIES", "Family", "NAMES", "detect_folder", "detect_single_file", "family_class",
           "is_single_file", "resolve_family"]
