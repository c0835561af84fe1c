"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): an MMDiT transformer over 16-channel VAE latents in 2x2
patches, conditioned on CLIP-L + CLIP-G penultimate hidden states (side by side, zero-padded to T5's width) joined
along the sequence with T5-XXL's, plus both CLIPs' pooled embeddings; rectified-flow training with the scheduler's
fixed shift (3.0).

Base models: diffusers folders and hub ids (``StableDiffusion3Pipeline``), and transformer-only single files as
Stability AI ships them (``sd3.5_large.safetensors``: ``model.diffusion_model.joint_blocks.N…``) with the VAE, the
text encoders and the tokenizers from ``base_model_config`` (a diffusers SD3 folder) or the component path keys, as
every :class:`.transformer.TransformerFamily` loads them. Without ``base_model_config`` the configs (and both CLIP
tokenizers) come from the shipped ``models/configs/sd3*`` folder of the file's variant, read from its header.

Export: diffusers' format, and a single file that ComfyUI's SD3 key map reads: ComfyUI maps the diffusers module
names with a ``transformer.`` prefix onto its fused ``qkv`` weights itself ("regular diffusers sd3 lora format" in
``comfy/lora.py`` ``model_lora_keys_unet``, through ``comfy/utils.py`` ``mmdit_to_diffusers``), so no fusing is
needed and diffusers' own ``load_lora_weights`` reads the same file. Both continue as ``network_weights`` through
the shared reader (``export/load.py``): the single file has no ``alpha``, i.e. scale 1, its scale being in lora_B.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ....errors import ConfigError
from .base import Components
from .transformer import CONFIGS, TransformerFamily

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL
DEFAULT_T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
SINGLE_FILE_MARK = "joint_blocks.0.x_block.attn.qkv.weight"
CLIP = (("clip_text_model",), "text_projection.weight")  # CLIPTextModelWithProjection


def variant_of(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``sd3.5-large``, ``sd3.5-medium`` or ``sd3-medium`` from a single file's tensor names: SD3.5 added QK norms,
    SD3.5 Medium also the second (``attn2``) attention of MMDiT-X; Large has 38 blocks."""
    names = [k.removeprefix("model.diffusion_model.") for k in shapes]
    blocks = {int(k.split(".")[1]) for k in names if k.startswith("joint_blocks.")}
    if not any(".ln_q." in k for k in names):
        return "sd3-medium"
    if any(".attn2." in k for k in names) or len(blocks) < 38:
        return "sd3.5-medium"
    return "sd3.5-large"


class SD3(TransformerFamily):
    name = "sd3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    shipped_config = "sd3.5-large"  # the default; :meth:`config_folder` picks the file's variant
    native_resolution = 1024
    num_text_encoders = 3
    header_keys = (SINGLE_FILE_MARK,)
    components: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
    }
    encoder_kinds = {"text_encoder": CLIP, "text_encoder_2": CLIP,
                     "text_encoder_3": (("t5",), "encoder.block.0.layer.0.SelfAttention.q.weight")}
    vae_latent_channels = 16
    # as diffusers' train_dreambooth_lora_sd3.py: both streams' attention projections
    default_targets: ClassVar[list[str]] = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                            "attn.to_add_out"]
    text_encoder_lora = (0, 1)  # CLIP-L and CLIP-G; T5-XXL stays frozen
    text_encoder_parts = ENCODERS
    lora_loader_parts = ("transformer", "text_encoder", "text_encoder_2")
    base_model_version = "sd3"
    latent_downscale = 8
    image_patch = 2  # the transformer patchifies 2x2 latents itself: latent sides must be even

    # --- configs and variants ------------------------------------------------------------------------------------
    def config_folder(self) -> Path:
        if self.cfg.base_model_config is not None:
            return super().config_folder()
        return CONFIGS / self.variant

    @property
    def variant(self) -> str:
        """The SD3 variant of the base model (single file: from its header; folder: from the transformer config)."""
        if getattr(self, "_variant", None) is None:
            from ....models.checkpoint_file import read_weight_shapes
            from . import is_single_file

            base = self.cfg.base_model
            if is_single_file(base):
                self._variant = variant_of(read_weight_shapes(Path(base).expanduser()))
            else:
                self._variant = _variant_of_config(base)
        return self._variant

    def check_components(self) -> None:
        super().check_components()
        if self.cfg.use_dora:  # refused before training, not at export after it
            raise ConfigError(f"use_dora: DoRA is not exported for {self.title} (diffusers' SD3 loader drops it); "
                              "remove use_dora")

    def version_label(self, prediction_type: str | None) -> str:
        return "sd3.5" if self.variant.startswith("sd3.5") else "sd3"

    @property  # type: ignore[override]  # the variant's, not one per family
    def modelspec_architecture(self) -> str:
        """sd-scripts' spelling: ``stable-diffusion-3`` + ``-medium`` / ``-5-large`` / ``-5-medium``."""
        return {"sd3.5-large": "stable-diffusion-3-5-large/lora", "sd3.5-medium": "stable-diffusion-3-5-medium/lora"
                }.get(self.variant, "stable-diffusion-3-medium/lora")

    # --- prompts -------------------------------------------------------------------------------------------------
    def t5_tokens(self) -> int:
        return self.cfg.text_max_length or DEFAULT_T5_TOKENS

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        return self.t5_tokens() if index == 2 else tokenizer.model_max_length

    def meta_token_length(self, components: Components, index: int) -> int:
        return self.t5_tokens() if index == 2 else components.extra["text_configs"][index].max_position_embeddings

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """As ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None): both CLIPs' penultimate hidden states
        side by side, zero-padded to T5's width, then T5's tokens after them; pooled: both CLIPs' projections."""
        hidden, pooled = [], []
        for encoder, key in zip(text_encoders[:2], self.token_keys[:2]):
            out = encoder(tokens[key], output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders[2](tokens[self.token_keys[2]])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
        return {"hidden": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        config = components.denoiser.config
        tokens = components.extra["text_configs"][0].max_position_embeddings + self.t5_tokens()
        return {"hidden": torch.zeros(batch_size, tokens, config.joint_attention_dim),
                "pooled": torch.zeros(batch_size, config.pooled_projection_dim)}

    # --- denoiser ------------------------------------------------------------------------------------------------
    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The velocity; the transformer reads the sigma scaled to the scheduler's 1000 steps, as the pipeline."""
        dtype = denoiser.dtype
        return denoiser(hidden_states=noisy.to(dtype), timestep=(timesteps * 1000).to(dtype),
                        encoder_hidden_states=cond["hidden"].to(dtype), pooled_projections=cond["pooled"].to(dtype),
                        return_dict=False)[0]

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        tok = components.tokenizers
        return StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
            vae=components.vae, text_encoder=text_encoders[0], tokenizer=tok[0], text_encoder_2=text_encoders[1],
            tokenizer_2=tok[1], text_encoder_3=text_encoders[2], tokenizer_3=tok[2],
        )

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        return {**super().sample_kwargs(sample), "max_sequence_length": self.t5_tokens()}

    # --- export --------------------------------------------------------------------------------------------------
    def diffusers_lora_layers(self, part: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's names, as diffusers' ``train_dreambooth_lora_sd3.py`` saves every part."""
        return dict(state)

    def kohya_tensors(self, parts: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float,
                      conv_alpha: float | None, denoiser_config: Any) -> dict[str, torch.Tensor]:
        """The ComfyUI-loadable single file: diffusers module names under the part prefix (``transformer.``,
        ``text_encoder.``, ``text_encoder_2.``) with peft's ``lora_A`` / ``lora_B``.

        The trained scale ``alpha / rank`` is folded into ``lora_B`` and no ``alpha`` tensor is written: diffusers'
        SD3 loader refuses non-``lora`` keys and uses scale 1 without adapter metadata, and ComfyUI uses scale 1
        for a module without ``alpha``, so both reproduce the trained ``scale * B @ A`` exactly."""
        out: dict[str, torch.Tensor] = {}
        for part, state in parts.items():
            for key, tensor in state.items():
                module, kind = key.rsplit(".lora_", 1)
                if kind == "B.weight":
                    rank = tensor.shape[1]
                    out[f"{part}.{module}.lora_B.weight"] = (tensor * (alpha / rank)).contiguous()
                elif kind == "A.weight":
                    out[f"{part}.{module}.lora_A.weight"] = tensor.contiguous()
                else:
                    raise ConfigError(f"use_dora: DoRA is not exported for {self.title} (diffusers' SD3 loader drops "
                                      "it); remove use_dora")
        return out


def _variant_of_config(source: str) -> str:
    from diffusers import SD3Transformer2DModel

    try:
        config = SD3Transformer2DModel.load_config(source, subfolder="transformer")
    except (OSError, ValueError):
        return "sd3-medium"
    if not config.get("qk_norm"):
        return "sd3-medium"
    return "sd3.5-large" if config.get("num_layers", 0) >= 38 else "sd3.5-medium"


FAMILY = SD3
