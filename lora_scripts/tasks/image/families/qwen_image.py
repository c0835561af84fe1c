"""Qwen-Image: a 60-block MMDiT (``QwenImageTransformer2DModel``) over 2x2-packed latents of a 3-D VAE
(``AutoencoderKLQwenImage``, 16 channels, per-channel ``latents_mean`` / ``latents_std``), conditioned on the last
hidden state of Qwen2.5-VL-7B reading the prompt inside a fixed chat template (the template's first 34 tokens are
dropped, as ``QwenImagePipeline`` does). Flow matching with the scheduler's resolution-dependent (dynamic) shift.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .base import Components
from .flow_common import FlowLoRAMixin, strip_prefix
from .transformer import TransformerFamily

# QwenImagePipeline.__init__ sets these on the instance; restated (not importable as constants) and checked against
# the pipeline's own encode_prompt in tests/test_family_qwen_image.py
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 34
PIPELINE_MAX_LENGTH = 1024  # QwenImagePipeline refuses longer prompts


class QwenImage(FlowLoRAMixin, TransformerFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    denoiser_class = "QwenImageTransformer2DModel"
    components: ClassVar[dict[str, tuple[str, str]]] = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"), "vae": ("diffusers", "AutoencoderKLQwenImage"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer")}
    # ComfyUI's qwen_2.5_vl_7b.safetensors and the diffusers folder both hold the language model's layers
    encoder_kinds = {"text_encoder": (("qwen2_5_vl",), "layers.0.self_attn.q_proj.weight")}
    shipped_config = "qwen-image"
    # attention projections of both streams, as diffusers' DreamBooth LoRA script and ai-toolkit's Qwen-Image recipe
    default_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out"]
    lora_loader_parts = ("transformer",)
    base_model_version = "qwen_image"
    modelspec_architecture = "qwen-image/lora"
    modelspec_implementation = "https://github.com/QwenLM/Qwen-Image"
    latent_downscale = 8
    image_patch = 2

    @classmethod
    def matches_header(cls, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        # img_mod/txt_mod per block and a top-level txt_norm: neither FLUX (norm1.linear) nor SD3 (context_embedder)
        names = strip_prefix(shapes)
        return ("txt_norm.weight" in names and "transformer_blocks.0.img_mod.1.weight" in names
                and "txt_in.text_norm.weight" not in names)  # the last: Qwen-Image 2.1, another architecture

    # --- prompts -------------------------------------------------------------------------------------------------
    @property
    def text_length(self) -> int:
        return min(self.cfg.text_max_length or 512, PIPELINE_MAX_LENGTH)

    @property
    def token_keys(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask")

    def tokenize(self, tokenizers: list[Any], prompt: str) -> dict[str, torch.Tensor]:
        """The templated prompt padded to ``text_max_length`` + the dropped template tokens (so batches stack)."""
        out = tokenizers[0](PROMPT_TEMPLATE.format(prompt), padding="max_length", truncation=True,
                            max_length=self.text_length + TEMPLATE_DROP, return_tensors="pt")
        return {"input_ids": out.input_ids[0], "attention_mask": out.attention_mask[0]}

    def max_tokens(self, tokenizer: Any, index: int) -> int:
        return self.text_length

    def encode_prompt(self, text_encoders: list[torch.nn.Module], tokens: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """As ``QwenImagePipeline._get_qwen_prompt_embeds``: the last hidden state of the valid (right-padded)
        tokens after the template's first 34, zeros past them; the mask marks the valid ones. Fixed length, so
        cached embeddings stack; the transformer masks the padding, so the length does not change its output."""
        mask = tokens["attention_mask"]
        hidden = text_encoders[0](input_ids=tokens["input_ids"], attention_mask=mask,
                                  output_hidden_states=True).hidden_states[-1]
        mask = mask[:, TEMPLATE_DROP:]
        embeds = hidden[:, TEMPLATE_DROP:] * mask[..., None].to(hidden.dtype)
        return {"prompt_embeds": embeds, "prompt_mask": mask.long()}

    def meta_tokens(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        length = self.text_length + TEMPLATE_DROP
        return {"input_ids": torch.zeros(batch_size, length, dtype=torch.long),
                "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}

    def meta_conditioning(self, components: Components, batch_size: int) -> dict[str, torch.Tensor]:
        config = components.extra["text_configs"][0]
        hidden = getattr(config, "text_config", config).hidden_size
        return {"prompt_embeds": torch.zeros(batch_size, self.text_length, hidden),
                "prompt_mask": torch.ones(batch_size, self.text_length, dtype=torch.long)}

    # --- latents -------------------------------------------------------------------------------------------------
    def latent_shape(self, vae: torch.nn.Module, height: int, width: int) -> tuple[int, ...]:
        f = 2 ** len(vae.config.temperal_downsample)
        return (vae.config.z_dim, height // f, width // f)

    def latent_distribution(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3-D VAE reads an image as one frame: (B, 3, 1, H, W); the frame axis is dropped from the result."""
        dist = vae.encode(pixels.to(vae.dtype)[:, :, None]).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def normalize_latents(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel ``(z - latents_mean) / latents_std`` (the inverse of what the pipeline does before decoding)."""
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return (latents - mean) / std

    # --- objective and denoiser ----------------------------------------------------------------------------------
    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pack 2x2, call the transformer as the pipeline does (timestep = sigma: the pipeline passes t / 1000 with
        t = 1000 sigma), unpack. The output is the velocity ``noise - x0`` the scheduler's Euler step integrates."""
        from diffusers import QwenImagePipeline

        b, c, h, w = noisy.shape
        dtype = denoiser.dtype
        packed = QwenImagePipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        out = denoiser(hidden_states=packed, timestep=timesteps.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                       encoder_hidden_states_mask=cond["prompt_mask"], img_shapes=[[(1, h // 2, w // 2)]] * b,
                       return_dict=False)[0]
        return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]

    def lora_targets(self, denoiser: torch.nn.Module) -> list[str]:
        """The targets as full module paths, without the last block's text-stream output projection: the
        transformer returns only the image stream, so that LoRA would never get a gradient (and DDP refuses
        parameters without one)."""
        wanted = super().lora_targets(denoiser)
        dead = f"transformer_blocks.{len(denoiser.transformer_blocks) - 1}.attn.to_add_out"
        names = sorted(name for name, module in denoiser.named_modules()
                       if isinstance(module, torch.nn.Linear) and name != dead
                       and any(name == t or name.endswith("." + t) for t in wanted))
        return names or wanted  # nothing matched: the task's one-line "matched no layer" error

    # --- sampling ------------------------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module, text_encoders: list[torch.nn.Module]):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config),
                                 vae=components.vae, text_encoder=text_encoders[0],
                                 tokenizer=components.tokenizers[0], transformer=denoiser)

    def sample_kwargs(self, sample: Any) -> dict[str, Any]:
        """Qwen-Image's CFG is ``true_cfg_scale`` with a negative prompt (``guidance_scale`` is for distilled
        variants); without a negative prompt the pipeline runs unguided."""
        kwargs: dict[str, Any] = {"true_cfg_scale": sample.guidance_scale}
        kwargs["negative_prompt"] = sample.negative_prompt or " "
        return kwargs

    # --- export --------------------------------------------------------------------------------------------------
    def single_file_name(self, module: str) -> str:
        """kohya's naming as musubi-tuner writes Qwen-Image LoRAs: ``lora_unet_`` + the diffusers path with
        underscores. ComfyUI's ``model_lora_keys_unet`` maps ``lora_unet_<key>`` for every ``diffusion_model.``
        weight, and Qwen-Image's ComfyUI weights carry the diffusers names."""
        return "lora_unet_" + module.replace(".", "_")


FAMILY = QwenImage
