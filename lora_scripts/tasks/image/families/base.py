"""What a model family tells the image task: how it is recognised, how it loads, how a prompt is encoded, its
objective, how its denoiser is called, its default LoRA targets, its sampling pipeline and its export names.

The task and the loop never compare family names; they ask the family. Adding a family is one module in this
package that subclasses :class:`Family` and is listed in ``families/__init__.py`` (see docs/model-families.md).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP attention, as diffusers' scripts train
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


@dataclass
class Components:
    """A loaded (or meta-device) base model: the denoiser, the VAE, the text encoders and their tokenizers (in the
    family's order), and the noise scheduler."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)


class Family(ABC):
    """One image model family. Class attributes describe it; methods do what differs between families."""

    name: ClassVar[str]                       # the value of ``model_family:``
    title: ClassVar[str]                      # for messages: "FLUX.1"
    pipeline_class: ClassVar[str]             # diffusers pipeline (model_index ``_class_name``, save_lora_weights)
    pipeline_aliases: ClassVar[tuple[str, ...]] = ()  # other ``_class_name`` values of the same family
    denoiser_name: ClassVar[str] = "transformer"      # the pipeline's attribute and subfolder
    denoiser_class: ClassVar[str] = ""                # diffusers model class of the denoiser
    native_resolution: ClassVar[int] = 1024
    default_targets: ClassVar[list[str]] = []
    text_encoder_lora: ClassVar[tuple[int, ...]] = ()  # indices of text encoders that train_text_encoder adapts
    text_encoder_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # their export part names
    lora_loader_parts: ClassVar[tuple[str, ...]] = ()  # parts the diffusers pipeline's save_lora_weights accepts
    base_model_version: ClassVar[str] = ""            # kohya ``ss_base_model_version``
    modelspec_architecture: ClassVar[str] = ""        # ``modelspec.architecture``
    modelspec_implementation: ClassVar[str] = "diffusers"
    latent_downscale: ClassVar[int] = 8              # pixels per latent, per side
    image_patch: ClassVar[int] = 1                   # latents per image token, per side (FLUX packs 2x2)
    size_keys: ClassVar[tuple[str, ...]] = ()        # batch keys :meth:`size_conditioning` returns
    swap_block_lists: ClassVar[tuple[str, ...]] = ()  # denoiser attributes holding its blocks, in the order they run

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        # what :meth:`load` reads the weights as: the run's weight dtype (half on a GPU), so the CPU holds 2 bytes a
        # parameter while loading, not 4 (FLUX.1-dev with T5-XXL: ~33 GiB instead of ~62)
        self.load_dtype = torch.float32

    def dtype_kwargs(self, lib: str) -> dict[str, Any]:
        """The ``from_pretrained`` keyword for :attr:`load_dtype` in ``lib`` (diffusers or transformers)."""
        return {"torch_dtype" if lib == "diffusers" else "dtype": self.load_dtype}

    # --- recognition ---------------------------------------------------------------------------------------------
    @classmethod
    def matches_model_index(cls, model_index: Mapping[str, Any]) -> bool:
        """A diffusers folder's ``model_index.json`` belongs to this family."""
        return model_index.get("_class_name") in (cls.pipeline_class, *cls.pipeline_aliases)

    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """A single file's tensor names (and shapes) belong to this family."""
        return False

    # --- loading -------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, base_model: str) -> Components:
        """Load every component (weights on the CPU, float32) from a folder, hub id or single file."""

    @abstractmethod
    def meta_components(self, base_model: str) -> Components:
        """Every component built on the meta device from config files only (for the memory estimate)."""

    def check_single_file(self, path: Path) -> None:
        """Cheap check (header only) that a single file can be loaded as this family; raise ConfigError if not."""
        raise ConfigError(f"base_model: '{path}' is a single file; {self.title} is loaded from a diffusers folder "
                          "or hub id here")

    def check_components(self) -> None:
        """Cheap checks of separately given component paths (``vae_path``, ``text_encoder_path``…)."""
        for key in ("vae_path", "text_encoder_path", "text_encoder_2_path"):
            if getattr(self.cfg, key, None) is not None:
                raise ConfigError(f"{key}: {self.title} models are loaded whole; remove {key}")

    # --- prompts -------------------------------------------------------------------------------------------------
    @property
    def token_keys(self) -> tuple[str, ...]:
        """Batch keys of the token ids :meth:`tokenize` returns (``input_ids``, ``input_ids_2``…)."""
        return ("input_ids", "input_ids_2", "input_ids_3")[: self.num_text_encoders]

    num_text_encoders: ClassVar[int] = 1

    def tokenize(self, tokenizers: list[Any], prompt: str) -> dict[str, torch.Tensor]:
        """One prompt as the family's text encoders read it (padded to a fixed length, so batches stack)."""
        return {key: _pad_ids(tokenizer, prompt, self.max_tokens(tokenizer, index))
                for index, (key, tokenizer) in enumerate(zip(self.token_keys, tokenizers))}

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        """Tokens per prompt for the ``index``-th tokenizer (CLIP: its model_max_length)."""
        return tokenizer.model_max_length

    @abstractmethod
    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """Batched token ids -> the conditioning tensors the denoiser reads (what the text-embedding cache holds)."""

    def size_conditioning(self, crop: Any, target_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning on image size and crop (SDXL's ``time_ids``); none by default."""
        return {}

    def meta_tokens(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        """Zero token ids of the real lengths, for the memory estimate."""
        return {key: torch.zeros(batch_size, self.meta_token_length(components, i), dtype=torch.long)
                for i, key in enumerate(self.token_keys)}

    def meta_token_length(self, components: Components, index: int) -> int:
        return components.extra["text_configs"][index].max_position_embeddings

    @abstractmethod
    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        """Zero conditioning tensors of the cached shapes (what :meth:`encode_prompt` returns), for the estimate."""

    # --- latents -------------------------------------------------------------------------------------------------
    def latent_shape(self, vae: torch.nn.Module, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's latents (without the batch dimension)."""
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return (vae.config.latent_channels, height // f, width // f)

    def latent_distribution(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's posterior for pixels in [-1, 1], shape (B, 3, H, W)."""
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return dist.mean, dist.std

    def normalize_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample -> the denoiser's latent space."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # --- objective and denoiser ----------------------------------------------------------------------------------
    @abstractmethod
    def objective(self, scheduler: Any) -> Any:
        """The training objective (:mod:`..objectives`) for this model's scheduler."""

    @abstractmethod
    def noise(self, objective: Any, latents: torch.Tensor, generators: list[torch.Generator]) -> Any:
        """Draw noise and timesteps per sample: a :class:`..objectives.NoisedBatch`."""

    @abstractmethod
    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction, in the latents' layout."""

    def swap_blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's blocks that ``blocks_to_swap`` may keep in CPU memory, in the order they run (empty: the
        family does not support block swap)."""
        return [block for name in self.swap_block_lists for block in getattr(denoiser, name)]

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        """The denoiser's LoRA target modules: ``target_modules`` or the family's defaults (a family can leave out
        modules whose output the model never uses, which DDP would otherwise refuse as parameters without grad)."""
        return list(self.cfg.target_modules or self.default_targets)

    # --- sampling ------------------------------------------------------------------------------------------------
    @abstractmethod
    def pipeline(self, components: Components, denoiser: torch.nn.Module,
                 text_encoders: list[torch.nn.Module]) -> Any:
        """The family's diffusers pipeline over the given (LoRA-carrying) modules, nothing reloaded."""

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        """Pipeline call arguments for one configured sample prompt besides prompt, size, steps and seed."""
        kwargs: dict[str, Any] = {"guidance_scale": sample.guidance_scale}
        if sample.negative_prompt:
            kwargs["negative_prompt"] = sample.negative_prompt
        return kwargs

    # --- export --------------------------------------------------------------------------------------------------
    @abstractmethod
    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        """The single-file (kohya / ComfyUI) LoRA tensors from peft state dicts per part."""

    def diffusers_lora_layers(self, part: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One part's peft state dict as the pipeline's ``save_lora_weights`` takes it. The UNet loaders read
        diffusers' ``lora.down``/``lora.up`` names; the transformer loaders take peft's ``lora_A``/``lora_B`` as they
        are (renaming them there hides ``to_q``/``to_k``/``to_v``/``to_out`` from the loader)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        if part == "transformer":
            return dict(state)
        return convert_state_dict_to_diffusers(state)

    def apply_network_weights(self, path: Path, modules: Mapping[str, torch.nn.Module]) -> None:
        """Continue from an existing LoRA (``network_weights``) in any format this family exports or reads."""
        from ....export.load import apply_network_weights

        apply_network_weights(path, modules, family=self.name)

    def version_label(self, prediction_type: str | None) -> str:
        """kohya's ``ss_base_model_version``."""
        return self.base_model_version


def _pad_ids(tokenizer: Any, prompt: str, length: int) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", truncation=True, max_length=length,
                     return_tensors="pt").input_ids[0]


def read_model_index(folder: Path) -> dict[str, Any] | None:
    """A diffusers folder's ``model_index.json``, or None if it has none."""
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base_model: cannot read '{path}' ({exc}); fix or re-download the model folder") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
