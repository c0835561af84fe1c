"""Reading single-file checkpoints (``.safetensors`` / ``.ckpt``) without trusting or fully loading them: tensor
names and shapes from the header, tensors by name prefix, and the model family from the names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError

Family = Literal["sd1", "sd2", "sdxl"]

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET = "model.diffusion_model."


def read_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name in a checkpoint with its shape, without reading the tensors (a ``.ckpt`` is memory-mapped,
    falling back to a plain weights-only load for the legacy non-zip format). Raises ConfigError if unreadable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"base_model: '{path}' is a folder, not a single-file checkpoint; pass the .safetensors "
                          "or .ckpt file (a diffusers folder is loaded as such)")
    if not path.is_file():
        raise ConfigError(f"base_model: checkpoint '{path}' not found; check the path")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"base_model: '{path}' is not a readable safetensors file ({first_line(exc)}); "
                              "re-download or re-export it") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ConfigError(f"base_model: '{path}' is neither .safetensors nor .ckpt; pass a single-file checkpoint "
                          "or a diffusers folder")
    return {key: tuple(value.shape) for key, value in read_torch_state_dict(path).items()}


def read_torch_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a ``.ckpt``: ``weights_only`` (no code runs), memory-mapped where the format allows."""
    import pickle

    import torch

    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = first_line(exc)
        if "Weights only load failed" in reason:  # torch's long advice to unpickle anything; we never do
            reason = "it holds pickled Python objects besides tensors, which are not loaded for safety"
        raise ConfigError(f"base_model: '{path}' cannot be read as a weights-only torch checkpoint "
                          f"({reason.split('. ')[0][:120]}); re-download it, or re-export it as .safetensors") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ConfigError(f"base_model: '{path}' holds a {type(data).__name__}, not a state dict of weights")
    return {key: value for key, value in data.items() if isinstance(key, str) and hasattr(value, "shape")}


def first_line(exc: BaseException) -> str:
    """An exception's first line, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_tensors(path: Path, prefix: str) -> dict[str, Any]:
    """The tensors whose names start with ``prefix`` (only those are read from a safetensors file)."""
    if Path(path).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}
    return {key: value for key, value in read_torch_state_dict(Path(path)).items() if key.startswith(prefix)}


LDM_CLIP = "cond_stage_model.transformer."


def modern_clip_name(key: str) -> str:
    """SD 1.x files saved with transformers < 4.22 lack CLIP's ``text_model.`` level; A1111 renames them on load."""
    if key.startswith(LDM_CLIP) and not key.startswith(LDM_CLIP + "text_model."):
        return LDM_CLIP + "text_model." + key[len(LDM_CLIP):]
    return key


def family_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path | str = "checkpoint") -> Family:
    """SD 1.x / 2.x / SDXL from an LDM state dict's names: the text encoders' layout tells them apart
    (OpenAI CLIP under ``cond_stage_model.transformer``, OpenCLIP under ``cond_stage_model.model``, SDXL's two
    under ``conditioner.embedders``)."""
    keys = shapes.keys()
    if not any(key.startswith(UNET) for key in keys):
        if any(key.startswith(("lora_unet_", "lora_te", "unet.", "transformer.")) and "lora" in key for key in keys):
            raise ConfigError(f"base_model: '{path}' is a LoRA, not a base model; put the model it was trained on "
                              "in base_model")
        raise ConfigError(f"base_model: '{path}' has no UNet weights (model.diffusion_model.*); it is not an "
                          "SD 1.x/2.x/SDXL checkpoint (a VAE or another model?)")
    if any(key.startswith("conditioner.embedders.") for key in keys):
        if any(key.startswith("conditioner.embedders.0.transformer.") for key in keys) and \
                any(key.startswith("conditioner.embedders.1.model.") for key in keys):
            return "sdxl"
        raise ConfigError(f"base_model: '{path}' is an SGM checkpoint but not SDXL base (an SDXL refiner?); only "
                          "SD 1.x, SD 2.x and SDXL base checkpoints are supported")
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return "sd1"
    raise ConfigError(f"base_model: '{path}' has UNet weights but no text encoder this loader knows "
                      "(cond_stage_model.* for SD 1.x/2.x, conditioner.embedders.* for SDXL); use a full checkpoint")


def detect_family(path: Path | str) -> Family:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` for a single-file checkpoint, from its tensor names only.
    Raises ConfigError (one line: the file and what to do) for a missing, unreadable or unrecognised file."""
    return family_from_shapes(read_weight_shapes(Path(path)), path)
